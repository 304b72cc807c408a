"""Request limits and input images: base64 / data-URL decoding with the decompression-bomb guard, and the
checks every GenRequest passes (sizes and batch in the artifact's range, steps, prompt length)."""

from __future__ import annotations

import base64
import binascii
import io
import re

from sdrt.serve.errors import ApiError
from sdrt.serve.executor import GenRequest, encode_png

_B64_SPACE = re.compile(rb"\s+")


def decode_image(value, field: str, max_pixels: int):
    """Raw base64 or ``data:image/...;base64,`` -> a loaded RGB/RGBA/L PIL image; ApiError(400) naming ``field``.
    URLs are never fetched. The pixel count is checked from the header before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{field}: expected a base64-encoded image string")
    if value.startswith(("http://", "https://", "file:", "ftp:")):
        raise ApiError(400, f"{field}: URLs are not fetched; send the image as base64 or a data: URL")
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise ApiError(400, f"{field}: a data URL must look like data:image/png;base64,...")
    try:
        raw = base64.b64decode(_B64_SPACE.sub(b"", value.encode("ascii")), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ApiError(400, f"{field}: not valid base64") from None
    limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
    try:
        with Image.open(io.BytesIO(raw)) as handle:
            width, height = handle.size
            if width * height > limit:
                raise ApiError(400, f"{field}: image declares {width}x{height} pixels, over the limit of {limit}; "
                                    "refusing it as a decompression bomb")
            handle.load()
            image = handle.copy()
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(400, f"{field}: refusing a decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ApiError(400, f"{field}: not an image Pillow can read") from None
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    return image


def flatten(image, background=(255, 255, 255)):
    """RGB image; transparency composited over ``background`` (A1111's img2img_background_color, white)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA"):
        base = Image.new("RGBA", image.size, background + (255,))
        base.alpha_composite(image.convert("RGBA"))
        return base.convert("RGB")
    return image.convert("RGB")


def png_bytes(image) -> bytes:
    return encode_png(image)


def check_text(value, field: str, max_chars: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{field}: expected a string")
    if len(value) > max_chars:
        raise ApiError(400, f"{field}: {len(value)} characters, over the limit of {max_chars}")
    return value


def check_request(req: GenRequest, info: dict, options) -> GenRequest:
    """Raise ApiError(400) naming the field when ``req`` is outside the server's or the artifact's limits."""
    sizes, scale = info["sizes"], info.get("vae_scale_factor", 8)
    check_text(req.prompt, "prompt", options.max_prompt_chars)
    check_text(req.negative_prompt, "negative_prompt", options.max_prompt_chars)
    if not isinstance(req.steps, int) or isinstance(req.steps, bool) or not 1 <= req.steps <= options.max_steps:
        raise ApiError(400, f"steps: must be an integer in 1..{options.max_steps}, got {req.steps!r}")
    if not 1 <= req.count <= options.max_images:
        raise ApiError(400, f"batch: {req.count} images requested, this server allows 1..{options.max_images}")
    if req.batch_size is not None and not 1 <= req.batch_size <= sizes["max_batch"]:
        raise ApiError(400, f"batch_size: {req.batch_size} is outside this artifact's range 1..{sizes['max_batch']}")
    for field, value in (("width", req.width), ("height", req.height)):
        if value is None:
            continue
        if value % scale or not sizes["min_size"] <= value <= sizes["max_size"]:
            raise ApiError(400, f"{field}: {value} must be a multiple of {scale} in this artifact's range "
                                f"{sizes['min_size']}..{sizes['max_size']}")
    if req.mode not in ("txt2img", "img2img", "inpaint"):
        raise ApiError(400, f"mode: must be txt2img, img2img or inpaint, got {req.mode!r}")
    if req.mode == "inpaint" and not req.mask_png:
        raise ApiError(400, "mask: inpaint needs a mask")
    if req.mode == "txt2img" and info.get("inpainting_unet"):
        raise ApiError(400, "mode: this artifact is an inpainting model; send an image and a mask")
    if req.strength is not None and not (isinstance(req.strength, (int, float)) and 0 < req.strength <= 1):
        raise ApiError(400, f"strength: must be in (0, 1], got {req.strength!r}")
    if not isinstance(req.guidance, (int, float)) or not 0 <= req.guidance <= 100:
        raise ApiError(400, f"guidance: must be a number in 0..100, got {req.guidance!r}")
    if req.scheduler is not None:
        from sdrt import schedulers
        from sdrt.errors import SchedulerNameError

        try:
            schedulers.resolve(req.scheduler)
        except SchedulerNameError as exc:
            raise ApiError(400, f"scheduler: {exc}") from None
    if req.rng != "cpu":
        from sdrt.serve.extras import rng_name

        rng_name(req.rng)
    for seed in req.seeds:
        if not -2**63 <= seed < 2**64:
            raise ApiError(400, f"seed: {seed} is outside [-2**63, 2**64 - 1]")
    return req
