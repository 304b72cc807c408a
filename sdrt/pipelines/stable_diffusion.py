"""Stable Diffusion orchestration: txt2img, img2img and inpaint from an ENGINE_DIR, with diffusers' semantics.

Mirrors ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` step for step, including the order of random draws, so a seed
gives the same image as diffusers with ``torch.Generator("cpu").manual_seed(seed)``. The same code
serves SD2.x/SD-Turbo (as those classes), LCM (``LatentConsistencyModelPipeline``: guidance through
``timestep_cond``, no CFG) and SDXL (``StableDiffusionXL{,Img2Img,Inpaint}Pipeline``, 4- and 9-channel
UNets); the differences live in ``conditioning.py`` and in small functions here, keyed on the model's dims.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from sdrt import schedulers
from sdrt.arrays import check_finite, to_host
from sdrt.conditioning import TextConditioner, uses_text_cfg
from sdrt.controlnet import Control, parse_control
from sdrt.errors import InputError
from sdrt.guidance import check_guidance, guide, uses_cfg
from sdrt.images import check_same_size, load_image, preprocess_image, preprocess_mask, to_uint8, to_unit
from sdrt.lora import extract_tags, lora_parameters
from sdrt.pipelines.base import BasePipeline, Result, StepCallback, Timings
from sdrt.pipelines.loop import denoise
from sdrt.rng import GeneratorList, TorchGenerator, random_seed
from sdrt.rng_cuda import RngSpec, parse_rng
from sdrt.schedulers.common import astype
from sdrt.specs import TINY_VAE_DECODER, TINY_VAE_ENCODER, UNET, UNET_CONTROL, VAE_DECODER, VAE_ENCODER, ModelDims
from sdrt.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

VAES = ("full", "tiny")  # tiny: the TAESD (AutoencoderTiny) that `sdrt export --tiny-vae` added


def default_inpaint_strength(dims: ModelDims) -> float:
    """diffusers' default inpaint strength: 1.0 for ``StableDiffusionInpaintPipeline``, 0.9999 for
    ``StableDiffusionXLInpaintPipeline`` (one step fewer, and the image's latents under the first noise)."""
    return 0.9999 if dims.has_text_encoder_2 else 1.0


def per_image_generator(seeds, batch: int, rng=None):
    """``seed=[s0, s1, ...]``: one generator per image (diffusers' list of ``torch.Generator``; for inpaint,
    diffusers given one input image per generator). Every draw of image k, noise, posterior samples of
    the VAE encoder and the scheduler's step noise, comes from generator k in a batch-1 run's order, so
    image k equals a batch-1 run with seed ``s_k``. A list of one seed is that seed."""
    seeds = list(seeds)
    if len(seeds) != batch:
        raise InputError(f"{len(seeds)} seeds given for a batch of {batch}: give one seed per image")
    rng = TorchGenerator if rng is None else rng
    return rng(seeds[0]) if len(seeds) == 1 else GeneratorList(seeds, rng)


class StableDiffusionPipeline(BasePipeline):
    """A Stable Diffusion model (SD1.x, SD2.x, SDXL, LCM) opened from an ENGINE_DIR; engines open on first use."""

    # the UNet runs at one shape per generation: TensorRT replays it from a CUDA graph
    CUDA_GRAPH_COMPONENTS = (UNET,)

    def __init__(self, engine_dir: str | os.PathLike, backend: str = "ort-cpu", threads: int | None = None,
                 xp=None, manifest=None):
        super().__init__(engine_dir, backend, threads, xp, manifest)
        for section in ("tokenizer", "tokenizer_2"):
            for record in self.manifest.data.get(section, {}).get("files", []):
                self.manifest.check_file(record)
        self.tokenizer = ClipTokenizer.from_dir(self.manifest.tokenizer_dir)
        tokenizers = [self.tokenizer]
        if self.manifest.tokenizer_2_dir is not None:
            tokenizers.append(ClipTokenizer.from_dir(self.manifest.tokenizer_2_dir))
        self.conditioner = TextConditioner(self.dims, tokenizers, self.engine,
                                           self.manifest.force_zeros_for_empty_prompt)
        self.load_seconds = time.perf_counter() - self._start

    def txt2img(self, prompt: str, **options) -> Result:
        return self._generate("txt2img", prompt, **options)

    def img2img(self, image, prompt: str, strength: float = 0.75, **options) -> Result:
        return self._generate("img2img", prompt, image=image, strength=strength, **options)

    def inpaint(self, image, mask, prompt: str, strength: float | None = None, **options) -> Result:
        """``strength`` None: the diffusers class's default (``default_inpaint_strength``)."""
        strength = default_inpaint_strength(self.dims) if strength is None else strength
        return self._generate("inpaint", prompt, image=image, mask=mask, strength=strength, **options)

    def _generate(self, mode, prompt, *, negative_prompt="", steps=30, guidance=7.5, seed=None, width=None,
                  height=None, scheduler=None, batch=1, callback: StepCallback | None = None, image=None,
                  mask=None, strength=1.0, vae="full", rng="cpu", control_images=None, control_scales=1.0,
                  control_start=0.0, control_end=1.0, guess_mode=False, loras=None, lora_dir=None) -> Result:
        """``rng``: whose generator ``seed`` reproduces: ``cpu`` (``torch.Generator("cpu")``, default) or
        ``cuda[:GPU]`` (``torch.Generator("cuda")`` on that GPU; see ``sdrt.rng_cuda.parse_rng``).
        ``control_images`` (one per exported ControlNet) and the other ``control_*``/``guess_mode``: see
        ``sdrt.controlnet``."""
        timings, m = Timings(), self.manifest
        # run-time LoRA (sdrt.lora_runtime): loras=[(path, weight)] and A1111 <lora:NAME:W> tags from lora_dir
        text, tagged = extract_tags(prompt, lora_dir)
        active = self.loras.activate(list(loras or []) + tagged)
        control = parse_control(m, control_images, control_scales, control_start, control_end, guess_mode)
        rng = rng if isinstance(rng, RngSpec) else parse_rng(rng)
        vae_parts = self._vae_choice(vae)
        guidance = check_guidance(guidance)
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise InputError(f"batch must be an integer >= 1, got {batch!r}")
        if mode != "txt2img" and not (isinstance(strength, (int, float, np.floating)) and 0 < strength <= 1):
            raise InputError(f"strength must be in (0, 1], got {strength!r}")
        if mode != "inpaint" and self.dims.unet_in_channels != self.dims.latent_channels:
            raise InputError(f"this model's UNet takes {self.dims.unet_in_channels} channels (an inpainting model); "
                             "use inpaint with an image and a mask")
        image, mask = self._inputs(mode, image, mask)
        scale = self.dims.vae_scale_factor
        default_w, default_h = (image.width - image.width % scale, image.height - image.height % scale) if image \
            else (m.sizes.opt_size, m.sizes.opt_size)
        width = default_w if width is None else width
        height = default_h if height is None else height
        m.sizes.check(width, height, batch, scale)
        sched = schedulers.from_config(m.scheduler_config, scheduler)
        seed = random_seed() if seed is None else seed
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        generator = per_image_generator(seeds, batch, rng) if isinstance(seed, (list, tuple)) else rng(seed)
        cfg = uses_text_cfg(self.dims, uses_cfg(guidance))

        conditioning = self.conditioner(text, negative_prompt, batch, cfg, width, height, guidance, timings)
        sched.set_timesteps(steps)
        timesteps, start = sched.timesteps, 0
        if mode != "txt2img":
            start = schedulers.img2img_start(steps, strength, sched.order)
            timesteps = timesteps[start:]
            if len(timesteps) == 0:
                raise InputError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
            sched.set_begin_index(start)
        shape = (batch, self.dims.latent_channels, height // scale, width // scale)

        if mode == "txt2img":
            latents, extra = generator.randn(shape) * np.float32(sched.init_noise_sigma), {}
        else:
            latents, extra = self._prepare_image_latents(
                mode, image, mask, width, height, shape, strength, timesteps[0], sched, generator, cfg, timings,
                vae_parts)

        if control is not None:
            control = Control(control, self.dims, self.engine, self.xp, batch, cfg, width, height, len(timesteps))
        latents = self._denoise(mode, latents, extra, conditioning, sched, timesteps, cfg, guidance, generator,
                                callback, timings, control)
        decoder, _, scaling = vae_parts
        vae_decoder = self.engine(decoder)  # opened outside the stage: its time is ``load``
        with timings("vae_decode"):
            decoded = vae_decoder({"latent": latents / float(np.float32(scaling))})
        unit = to_unit(check_finite(to_host(decoded["images"]), f"decoded image ({decoder})"))
        unet_total = sum(timings.samples.get("unet", []))
        timings.samples["loop_overhead"] = [sum(timings.samples.pop("step", [])) - unet_total]
        params = {"mode": mode, "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                  "guidance": guidance, "seed": seed, "width": width, "height": height, "batch": batch,
                  "scheduler": scheduler or m.scheduler_config.get("_class_name"), "strength": strength, "vae": vae,
                  "rng": rng.name, **lora_parameters(active),
                  **(control.request.parameters() if control is not None else {})}
        return Result(to_uint8(unit), unit, seeds[0], timings.summary(), params, seeds)

    def _vae_choice(self, vae) -> tuple[str, str, float]:
        """(decoder, encoder, scaling factor) for ``vae``: the full AutoencoderKL or the tiny AutoencoderTiny,
        which diffusers' pipelines use the same way (``decode(latents / scaling_factor)``; 1.0 for TAESD)."""
        if vae not in VAES:
            raise InputError(f"vae must be one of {', '.join(VAES)}, got {vae!r}")
        if vae == "full":
            return VAE_DECODER, VAE_ENCODER, self.manifest.vae_scaling_factor
        section = self.manifest.data.get("tiny_vae")
        if not (self.manifest.has(TINY_VAE_DECODER) and self.manifest.has(TINY_VAE_ENCODER)
                and isinstance(section, dict)):
            raise InputError(f"{self.manifest.root} has no tiny VAE; add one with `sdrt export --model MODEL_DIR "
                             f"--out {self.manifest.root} --force --tiny-vae TAESD_DIR`")
        return TINY_VAE_DECODER, TINY_VAE_ENCODER, float(section.get("scaling_factor") or 1.0)

    def _denoise(self, mode, latents, extra, conditioning, sched, timesteps, cfg, guidance, generator, callback,
                 timings, control=None):
        """The shared loop (``loop.denoise``) in ``self.xp``: host inputs are copied in once, the final latents
        stay there."""
        xp, batch, channels = self.xp, latents.shape[0], latents.shape[1]
        rows = batch * (2 if cfg else 1)
        latents = xp.asarray(latents)
        extra = {k: xp.asarray(v) for k, v in extra.items() if v is not None}
        feeds = {**{k: xp.asarray(v) for k, v in conditioning.items()}, **self._unet_feeds(latents.shape, rows, extra)}
        sample = feeds["sample"]
        timestep_rows = xp.asarray(np.repeat(np.asarray(timesteps, np.float32)[:, None], rows, axis=1))
        unet = self.engine(UNET)

        def predict(i, t, scaled):
            # scaled once per image, then written into each CFG half of the reused UNet input
            for half in range(0, rows, batch):
                sample[half:half + batch, :channels, ...] = scaled
            feeds["timestep"] = timestep_rows[i, ...]
            residuals = control.residuals(i, feeds) if control is not None else None  # ControlNets' sum
            engine = self.engine(UNET_CONTROL) if residuals else unet  # (opened on first use, before the stage)
            with timings("unet"):
                out = engine({**feeds, **residuals}) if residuals else engine(feeds)
                noise_pred = out["out_sample"]
            return guide(noise_pred, guidance) if cfg else noise_pred

        # LCMScheduler's last step returns its denoised x0 as prev_sample, so decoding the final latents
        # equals LatentConsistencyModelPipeline decoding ``denoised``
        blend = None
        if mode == "inpaint" and self.dims.unet_in_channels == channels:
            def blend(i, stepped):
                return self._blend(stepped, extra, timesteps, i, sched)
        return denoise(xp, latents, sched, timesteps, generator, predict, timings, callback, blend)

    def _unet_feeds(self, shape, rows: int, extra: dict) -> dict:
        """``sample``, allocated once per generation in the loop's namespace: [uncond; cond] halves with
        CFG, and the 9-channel inpainting UNet's fixed mask and masked-image latents after the latents."""
        channels = shape[1]
        sample = self.xp.empty((rows, self.dims.unet_in_channels) + tuple(shape[2:]), dtype=self.xp.float32)
        if self.dims.unet_in_channels != channels:
            sample[:, channels:channels + 1, ...] = extra["mask"]
            sample[:, channels + 1:, ...] = extra["masked_latents"]
        return {"sample": sample}

    def _inputs(self, mode, image, mask):
        if mode == "txt2img":
            return None, None
        image = image if hasattr(image, "convert") else load_image(image, "image")
        if mode == "inpaint":
            mask = mask if hasattr(mask, "convert") else load_image(mask, "mask")
            check_same_size(image, mask)
        return image, mask

    def _encode_image(self, pixels, generator, timings, batch: int = 1, vae=None) -> np.ndarray:
        """VAE encode and sample the posterior with the runtime's RNG (diffusers' latent_dist.sample), as
        ``batch`` rows: one draw repeated, or with per-image seeds one draw per image from its generator.
        The tiny VAE's encoder gives latents, no distribution: diffusers' ``retrieve_latents`` draws nothing."""
        _, encoder, scaling = vae or self._vae_choice("full")
        if encoder == TINY_VAE_ENCODER:
            tiny = self.engine(encoder)
            with timings("vae_encode"):
                latents = tiny({"images": pixels})["latents"]
            check_finite(latents, f"image latents ({encoder})")
            return np.repeat(np.float32(scaling) * latents, batch // len(latents), axis=0)
        vae_encoder = self.engine(VAE_ENCODER)  # opened outside the stage: its time is ``load``
        with timings("vae_encode"):
            moments = vae_encoder({"images": pixels})
        mean, logvar = moments["mean"], moments["logvar"]
        draw_shape = (batch,) + mean.shape[1:] if isinstance(generator, GeneratorList) else mean.shape
        latents = mean + np.exp(np.float32(0.5) * logvar) * generator.randn(draw_shape)
        check_finite(latents, "image latents (VAE encoder)")
        return np.repeat(np.float32(self.manifest.vae_scaling_factor) * latents, batch // len(latents), axis=0)

    def _prepare_image_latents(self, mode, image, mask, width, height, shape, strength, t0, sched, generator,
                               cfg, timings, vae=None):
        """Initial latents for img2img/inpaint, drawing noise in diffusers' order."""
        batch = shape[0]
        pixels = preprocess_image(image, width, height)
        if mode == "img2img":
            image_latents = self._encode_image(pixels, generator, timings, batch, vae)
            noise = generator.randn(shape)
            return sched.add_noise(image_latents, noise, t0).astype(np.float32), {}
        full_strength = strength == 1.0
        image_latents = None
        if self.dims.unet_in_channels == 4 or not full_strength:
            image_latents = self._encode_image(pixels, generator, timings, batch, vae)
        noise = generator.randn(shape)
        if full_strength:
            latents = noise * np.float32(sched.init_noise_sigma)
        else:
            latents = sched.add_noise(image_latents, noise, t0).astype(np.float32)
        mask_pixels = preprocess_mask(mask, width, height)
        masked = self._encode_image(pixels * (mask_pixels < 0.5), generator, timings, batch, vae)
        scale = self.dims.vae_scale_factor
        mask_latent = np.repeat(mask_pixels[:, :, ::scale, ::scale], batch, axis=0)
        doubled = 2 if cfg else 1
        extra = {"mask": np.concatenate([mask_latent] * doubled), "masked_latents": np.concatenate([masked] * doubled),
                 "blend_mask": mask_latent, "image_latents": image_latents, "noise": noise}
        return latents, extra

    @staticmethod
    def _blend(latents, extra, timesteps, i, sched):
        """diffusers' inpaint for ordinary UNets: keep the unmasked region at the schedule's noise level."""
        proper = extra["image_latents"]
        if i < len(timesteps) - 1:
            proper = sched.add_noise(proper, extra["noise"], timesteps[i + 1])
        mask = extra["blend_mask"]
        return astype((1 - mask) * proper + mask * latents, latents.dtype)
