"""A1111's img2img-with-mask pre- and post-processing, around sdrt's diffusers-style inpaint.

As ``StableDiffusionProcessingImg2Img`` (modules/processing.py) and ``modules/masking.py`` do it:
binary mask (alpha or luminance), invert, Gaussian blur (``mask_blur_x/y``); "only masked"
(``inpaint_full_res``): crop around the mask plus ``inpaint_full_res_padding``, widened to the request's
aspect ratio, run at the request's size, resized back and pasted; otherwise the image and mask are
resized to the request's size (``resize_mode`` 0). Finally the input's own pixels are composited back
outside the blurred mask (A1111's overlay).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.serve.errors import ApiError


def binary_mask(mask):
    """A1111's create_binary_mask: the alpha channel when the mask has transparency, else luminance; > 128."""
    from PIL import Image

    if mask.mode in ("RGBA", "LA") and np.asarray(mask.getchannel("A")).min() < 255:
        gray = mask.getchannel("A")
    else:
        gray = mask.convert("L")
    return Image.fromarray(np.where(np.asarray(gray) > 128, 255, 0).astype(np.uint8))


def gaussian_blur(mask, sigma_x: float, sigma_y: float):
    """Separable Gaussian as OpenCV's GaussianBlur with kernel 2*int(2.5*sigma+0.5)+1, reflect-101 border."""
    from PIL import Image

    array = np.asarray(mask, dtype=np.float64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma <= 0:
            continue
        radius = int(2.5 * sigma + 0.5)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(array, pad, mode="reflect" if array.shape[axis] > radius else "edge")
        array = np.apply_along_axis(lambda v: np.convolve(v, taps, mode="valid"), axis, padded)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def crop_region(mask, padding: int) -> tuple[int, int, int, int] | None:
    """Bounding box of the mask's nonzero pixels grown by ``padding`` (inside the image), or None if empty."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_ratio(region, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow ``region`` along one axis to the aspect ratio width:height, shifted to stay inside the image."""
    x1, y1, x2, y2 = region
    want = width / height
    if (x2 - x1) / (y2 - y1) > want:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / want - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * want - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def fill_masked(image, mask):
    """A1111's inpainting_fill 0 ("fill"): the masked area painted with ever finer blurs of the rest."""
    from PIL import Image, ImageFilter, ImageOps

    canvas = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            canvas.alpha_composite(blurred)
    return canvas.convert("RGB")


@dataclass
class Prepared:
    image: object  # PIL RGB at the request's size: what the pipeline inpaints
    mask: object  # PIL L at the request's size (blurred; the pipeline binarizes at 0.5)
    original: object  # PIL RGB: the canvas results are composited onto (input size, or request size)
    overlay_mask: object  # PIL L on ``original``'s size: 255 = generated pixels, 0 = the original's
    paste: tuple | None  # (x, y, w, h) of the crop on ``original`` ("only masked"), or None
    extra: dict  # infotext fields


def prepare(image, mask, width: int, height: int, *, blur_x: float, blur_y: float, invert: bool, full_res: bool,
            padding: int, fill: int) -> Prepared | None:
    """None when "only masked" finds a blank mask: A1111 then logs 'Unable to perform "Inpaint Only mask" because
    mask is blank, switch to img2img mode' and runs img2img on the whole image, with no mask and no overlay."""
    from PIL import Image, ImageOps

    if mask.size != image.size:
        raise ApiError(400, f"mask: size {mask.width}x{mask.height} differs from init_images[0] "
                            f"{image.width}x{image.height}")
    mask = binary_mask(mask)
    if invert:
        mask = ImageOps.invert(mask)
    if blur_x > 0 or blur_y > 0:
        mask = gaussian_blur(mask, blur_x, blur_y)
    extra = {"Mask blur": max(blur_x, blur_y)} if blur_x > 0 or blur_y > 0 else {}
    region = crop_region(mask, padding) if full_res else None
    if full_res and region is None:
        return None
    if region is not None:
        region = expand_to_ratio(region, width, height, image.width, image.height)
        crop, crop_mask = image.crop(region), mask.crop(region)
        work = crop.resize((width, height), Image.Resampling.LANCZOS) if crop.size != (width, height) else crop
        work_mask = crop_mask.resize((width, height), Image.Resampling.LANCZOS)
        x1, y1, x2, y2 = region
        extra |= {"Inpaint area": "Only masked", "Masked area padding": padding}
        prepared = Prepared(work, work_mask, image, mask, (x1, y1, x2 - x1, y2 - y1), extra)
    else:
        work = image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
        work_mask = mask.resize((width, height), Image.Resampling.LANCZOS) if mask.size != (width, height) else mask
        overlay = Image.fromarray(np.clip(np.asarray(work_mask, np.float32) * 2, 0, 255).astype(np.uint8))
        prepared = Prepared(work, work_mask, work, overlay, None, extra)
    if fill == 0:
        prepared.image = fill_masked(prepared.image, prepared.mask)
    return prepared


def composite(generated, prepared: Prepared):
    """The generated image put back: pasted into the crop ("only masked"), then the original's pixels over
    it where the (blurred) mask is below 255, weighted by it (A1111's apply_overlay)."""
    from PIL import Image

    original = np.asarray(prepared.original.convert("RGB"), np.float32)
    if prepared.paste is not None:
        x, y, w, h = prepared.paste
        canvas = original.copy()
        part = generated.resize((w, h), Image.Resampling.LANCZOS) if generated.size != (w, h) else generated
        canvas[y:y + h, x:x + w] = np.asarray(part.convert("RGB"), np.float32)
    else:
        canvas = np.asarray(generated.convert("RGB"), np.float32)
    weight = np.asarray(prepared.overlay_mask, np.float32)[..., None] / 255.0
    out = canvas * weight + original * (1.0 - weight)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
