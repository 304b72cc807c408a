"""ControlNet at run time (Zhang et al. 2023), with the semantics of diffusers' ``StableDiffusionControlNetPipeline``,
``StableDiffusionXLControlNetPipeline`` and their img2img / inpaint variants, and of ``MultiControlNetModel``.

``parse_control`` checks a request (one control image per ControlNet in the artifact, a finite scale per
net, 0 <= start < end <= 1); ``Control`` holds one generation's preprocessed images (diffusers'
``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``: resized to the output size, RGB in [0, 1],
repeated over the batch, doubled for classifier-free guidance unless in guess mode) and computes each
step's summed residuals for the UNet (``unet_control``). A net outside its [start, end] window, or at scale
0, adds exactly zero, so it is skipped; a step with no net active runs the plain UNet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from sdrt.errors import InputError
from sdrt.images import _resized, load_image
from sdrt.specs import controlnet_name, control_residuals

DEFAULTS = {"control_scales": 1.0, "control_start": 0.0, "control_end": 1.0, "guess_mode": False}


class ControlNetError(InputError):
    """A ControlNet request that does not fit: image count, scale, start/end, or no ControlNet in the artifact."""


@dataclass(frozen=True)
class ControlRequest:
    images: tuple  # PIL images, one per ControlNet (controlnet_0, controlnet_1, ...)
    scales: tuple  # float per net (diffusers' controlnet_conditioning_scale)
    start: float  # control_guidance_start, a fraction of the denoising steps
    end: float  # control_guidance_end
    guess_mode: bool
    labels: tuple  # what Result.parameters records for each image (its path, or its size)

    def parameters(self) -> dict:
        return {"control_images": list(self.labels), "control_scales": list(self.scales),
                "control_start": self.start, "control_end": self.end, "guess_mode": self.guess_mode}


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ControlNetError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def parse_control(manifest, control_images=None, control_scales=1.0, control_start=0.0, control_end=1.0,
                  guess_mode=False) -> ControlRequest | None:
    """The checked request, or None without control images (the other arguments must then be defaults)."""
    images = [] if control_images is None else list(control_images) \
        if isinstance(control_images, (list, tuple)) else [control_images]
    count = manifest.dims.controlnets or 0
    if not images:
        given = {k: v for k, v in dict(control_scales=control_scales, control_start=control_start,
                                       control_end=control_end, guess_mode=guess_mode).items() if v != DEFAULTS[k]}
        if given:
            raise ControlNetError(f"{', '.join(given)} given without a control image")
        return None
    if not count:
        raise ControlNetError(f"{manifest.root} has no ControlNet; export one with `sdrt export --model MODEL_DIR "
                              f"--out {manifest.root} --force --controlnet CONTROLNET_DIR`")
    if len(images) != count:
        raise ControlNetError(f"{len(images)} control image(s) given for the {count} ControlNet(s) in "
                              f"{manifest.root}: give one --control-image per ControlNet, in export order")
    labels = tuple(str(image) if isinstance(image, (str, os.PathLike)) else f"<image {image.width}x{image.height}>"
                   for image in images)
    images = tuple(image if hasattr(image, "convert") else load_image(image, f"control image {k + 1}")
                   for k, image in enumerate(images))
    scales = list(control_scales) if isinstance(control_scales, (list, tuple)) else [control_scales] * count
    if len(scales) != count:
        raise ControlNetError(f"{len(scales)} control scales given for {count} ControlNet(s): give one per net")
    scales = tuple(_number(s, "control scale") for s in scales)
    start, end = _number(control_start, "control start"), _number(control_end, "control end")
    if not 0.0 <= start < end <= 1.0:
        raise ControlNetError(f"control start {start} and end {end} must satisfy 0 <= start < end <= 1 "
                              "(fractions of the denoising steps)")
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise ControlNetError(f"guess mode must be true or false, got {guess_mode!r}")
    return ControlRequest(images, scales, start, end, bool(guess_mode), labels)


def control_pixels(image, width: int, height: int) -> np.ndarray:
    """diffusers' control image preprocessing: RGB, resized (Lanczos) to the output size, float32 (1, 3, H, W)
    in [0, 1] (no [-1, 1] normalization)."""
    rgb = _resized(image.convert("RGB"), width, height)
    array = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def step_weights(request: ControlRequest, steps: int) -> list[list[float]]:
    """Per step, per net: scale x keep, keep = 0 outside [start, end] (diffusers' ``controlnet_keep``)."""
    return [[s * (1.0 - float(i / steps < request.start or (i + 1) / steps > request.end)) for s in request.scales]
            for i in range(steps)]


class Control:
    """One generation's ControlNet state; ``residuals(i, feeds)`` -> the UNet's extra feeds, or None."""

    def __init__(self, request: ControlRequest, dims, engine, xp, batch: int, cfg: bool, width: int, height: int,
                 steps: int):
        self.request, self.engine, self.xp, self.batch = request, engine, xp, batch
        self.split = cfg and request.guess_mode  # guess mode under CFG: nets see the conditional half only
        copies = 1 if not cfg or request.guess_mode else 2
        self.images = [xp.asarray(np.concatenate([np.repeat(control_pixels(image, width, height), batch, axis=0)]
                                                 * copies)) for image in request.images]
        self.specs = control_residuals(dims)
        self.names = [t.name for t in self.specs]
        count = len(self.names)
        # guess mode: diffusers' ControlNetModel scales residual j by logspace(-1, 0, n)[j] x scale
        self.factors = np.logspace(-1, 0, count).astype(np.float32) if request.guess_mode \
            else np.ones(count, np.float32)
        self.weights = step_weights(request, steps)
        self.channels = dims.latent_channels

    def residuals(self, i: int, feeds: dict) -> dict | None:
        xp, half = self.xp, self.batch if self.split else 0
        total = None
        for k, weight in enumerate(self.weights[i]):
            if weight == 0.0:
                continue
            net_feeds = {"sample": xp.ascontiguousarray(feeds["sample"][half:, :self.channels, ...]),
                         "controlnet_cond": self.images[k],
                         "conditioning_scale": self.factors * np.float32(weight)}
            for name in ("timestep", "encoder_hidden_states", "text_embeds", "time_ids"):
                if name in feeds:
                    net_feeds[name] = feeds[name][half:, ...]
            out = self.engine(controlnet_name(k))(net_feeds)
            total = [out[n] for n in self.names] if total is None else [a + out[n] for a, n in zip(total, self.names)]
        if total is None:
            return None
        if self.split:  # zeros for the unconditional half, as diffusers concatenates
            total = [xp.concatenate([xp.zeros_like(r), r]) for r in total]
        return dict(zip(self.names, total))


def cli_request(args) -> dict:
    """The pipeline's ``control_*`` / ``guess_mode`` keywords from ``--control-*`` (none without an image;
    a scale, start, end or guess mode given without one is refused by ``parse_control``, naming it)."""
    scales = getattr(args, "control_scale", None) or [1.0]
    request = {"control_images": getattr(args, "control_image", None) or None,
               "control_scales": scales[0] if len(scales) == 1 else scales,
               "control_start": getattr(args, "control_start", 0.0), "control_end": getattr(args, "control_end", 1.0),
               "guess_mode": bool(getattr(args, "guess_mode", False))}
    return {k: v for k, v in request.items() if k == "control_images" and v or k != "control_images"
            and v != DEFAULTS[k]}
