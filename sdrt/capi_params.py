"""Reading libsdrt's C request structs (capi/sdrt.h) for ``sdrt.capi_impl``: strings, paths, floats, images.

Each reader raises ``InputError`` naming the field; ``_extras`` turns sdrt_generate_params' V3 fields
(ControlNet, run-time LoRA, Kandinsky's prior) into Pipeline keywords. ``ffi`` is the library's, set by
``bind`` (from ``capi_impl.start``); nothing imports cffi here.
"""

from __future__ import annotations

import os

import numpy as np

from sdrt.errors import InputError

MODES = ("txt2img", "img2img", "inpaint")
STRENGTH_DEFAULT = -1.0  # SDRT_STRENGTH_DEFAULT
PRIOR_GUIDANCE_DEFAULT = -1.0  # SDRT_PRIOR_GUIDANCE_DEFAULT
MAX_LIST = 64  # control_count / lora_count above this is an uninitialized field, not a request
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

ffi = None


def bind(ffi_) -> None:
    """Keep the library's ffi (once per process, from ``capi_impl.start``)."""
    global ffi
    ffi = ffi_


def _text(pointer, what: str, default: str | None = None) -> str | None:
    if pointer == ffi.NULL:
        return default
    try:
        return ffi.string(pointer).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} is not valid UTF-8") from None


def _path(pointer) -> str:
    return os.fsdecode(ffi.string(pointer))


def _float(value: float) -> float:
    """A C float as the decimal the caller wrote (7.3f -> 7.3), so guidance matches the Python API's."""
    return float(str(np.float32(value)))


def _count(count: int, what: str) -> int:
    if not 0 <= count <= MAX_LIST:
        raise InputError(f"{what} is {count}; it must be in 0..{MAX_LIST}")
    return count


def _extras(pipe, p) -> dict:
    """The V3 fields (ControlNet, run-time LoRA, Kandinsky's prior) as Pipeline keywords, only those set."""
    out = {}
    count = _count(p.control_count, "control_count")
    if count:
        if p.control_images == ffi.NULL:
            raise InputError(f"control_count is {count} but control_images is NULL")
        out["control_images"] = [_image(p.control_images + k, f"control_images[{k}]") for k in range(count)]
        out["control_scales"] = [_float(p.control_scales[k]) for k in range(count)] \
            if p.control_scales != ffi.NULL else 1.0
    if count or (p.control_start, p.control_end, p.guess_mode) != (0.0, 1.0, 0):
        out.update(control_start=_float(p.control_start), control_end=_float(p.control_end),
                   guess_mode=bool(p.guess_mode))  # without images: refused by the pipeline, naming them
    count = _count(p.lora_count, "lora_count")
    if count:
        if p.lora_paths == ffi.NULL:
            raise InputError(f"lora_count is {count} but lora_paths is NULL")
        paths = [p.lora_paths[k] for k in range(count)]
        if any(path == ffi.NULL for path in paths):
            raise InputError(f"lora_paths[{[path == ffi.NULL for path in paths].index(True)}] is NULL")
        out["loras"] = [(_path(path), _float(p.lora_weights[k]) if p.lora_weights != ffi.NULL else 1.0)
                        for k, path in enumerate(paths)]
    prior = {}
    if p.prior_steps != 0:
        prior["prior_steps"] = p.prior_steps
    if p.prior_guidance != PRIOR_GUIDANCE_DEFAULT:
        prior["prior_guidance"] = _float(p.prior_guidance)
    if prior and not getattr(pipe, "has_prior", False):
        raise InputError(f"{', '.join(prior)}: only Kandinsky 2.2 artifacts have a prior")
    return out | prior


def _rng(text: str) -> str:
    """sdrt_generate_params.rng, checked as the CLI's --rng (the message names the field, not the flag)."""
    from sdrt.rng_cuda import parse_rng

    try:
        return parse_rng(text).name
    except InputError as exc:
        raise InputError("rng: " + str(exc).removeprefix("--rng").lstrip(": ")) from None


def _image(pointer, what: str):
    """An sdrt_image -> a PIL image (copied)."""
    from PIL import Image

    image = pointer[0]
    if image.data == ffi.NULL or image.width == 0 or image.height == 0:
        raise InputError(f"{what} has no pixels (data NULL or a zero size)")
    if image.channels not in PIL_MODES:
        raise InputError(f"{what}.channels is {image.channels}; it must be 1 (gray), 3 (RGB) or 4 (RGBA)")
    size = image.width * image.height * image.channels
    if size > 1 << 31:
        raise InputError(f"{what} is {image.width}x{image.height}x{image.channels}: more than 2 GiB")
    return Image.frombytes(PIL_MODES[image.channels], (image.width, image.height), ffi.buffer(image.data, size))
