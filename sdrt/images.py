"""Image I/O with Pillow: loading and checking inputs, diffusers' pre/post-processing, PNG output.

Pre- and post-processing follow diffusers' ``VaeImageProcessor``: Lanczos resize, [0, 255] ->
[-1, 1]; masks to grayscale, resized, binarized at 0.5; outputs (x / 2 + 0.5).clip(0, 1) and
``round(x * 255)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdrt.errors import ImageInputError, SdrtError


def load_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Open an image file fully (so errors surface here), or raise ImageInputError."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except UnidentifiedImageError:
        raise ImageInputError(f"{what} {path} is not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what} {path} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                              "refusing it as a decompression bomb") from None
    except OSError as exc:
        raise ImageInputError(f"{what} {path} cannot be read: {exc}") from None


def default_size(image: Image.Image, scale: int = 8) -> tuple[int, int]:
    """(width, height) of an image rounded down to multiples of the VAE scale, as diffusers does."""
    return image.width - image.width % scale, image.height - image.height % scale


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def preprocess_image(image: Image.Image, width: int, height: int) -> np.ndarray:
    """RGB image -> float32 (1, 3, H, W) in [-1, 1]."""
    rgb = _resized(image.convert("RGB"), width, height)
    array = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray((array * 2.0 - 1.0).transpose(2, 0, 1)[None])


def preprocess_mask(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """Mask -> float32 (1, 1, H, W) of 0 (keep) and 1 (repaint)."""
    gray = _resized(mask.convert("L"), width, height)
    array = np.asarray(gray, dtype=np.float32) / np.float32(255.0)
    return (array >= 0.5).astype(np.float32)[None, None]


def check_same_size(image: Image.Image, mask: Image.Image) -> None:
    if image.size != mask.size:
        raise ImageInputError(
            f"mask size {mask.width}x{mask.height} differs from image size {image.width}x{image.height}"
        )


def to_unit(decoded: np.ndarray) -> np.ndarray:
    """VAE output (N, 3, H, W) in [-1, 1] -> float32 (N, H, W, 3) in [0, 1]."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255).astype(np.uint8)


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, guidance: float,
                     seed: int, width: int, height: int, **extra) -> str:
    """Generation parameters in A1111's PNG "parameters" text format."""
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance, "Seed": seed,
              "Size": f"{width}x{height}", **extra}
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image: np.ndarray, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write a uint8 HxWx3 image as PNG atomically (temp file + rename), with a parameters chunk."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    except OSError as exc:
        raise SdrtError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(image).save(handle, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get the usual modes
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SdrtError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
