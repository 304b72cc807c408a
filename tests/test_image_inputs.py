"""img2img / inpaint with the inputs people actually pass, vs the live diffusers pipelines (max abs <= 1e-4).

A photo-sized picture (203x157: not a multiple of 8, so both sides round down and it is resized with
Lanczos, as ``VaeImageProcessor`` does), a grey (soft) mask with a gradient and a feathered disc
(binarized at 0.5 after resizing, as diffusers' mask processor does), and explicit output sizes of other
aspect ratios. diffusers gets the raw PIL images; nothing is pre-resized.

Two places where sdrt chooses differently, on purpose: without a size, ``inpaint`` makes an image of the
input's size rounded down to multiples of 8 (as img2img does in both), where diffusers' inpaint pipelines
default to the UNet's ``sample_size`` x 8 whatever the input; the test passes diffusers that size
explicitly. RGBA/L inputs are converted to RGB (diffusers' image processor keeps 4 channels, and then
takes an RGBA picture for latents), so only RGB inputs are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.images import default_size
from sdrt.pipeline import Pipeline
from sdrt_export.verify import load_reference, use_scheduler

torch = pytest.importorskip("torch")

BOUND = 1e-4
PROMPT = "a photo of a cat sitting on a red sofa"
SIZE = (203, 157)  # width, height


def photo(width: int, height: int) -> Image.Image:
    """Smooth, photo-like content: a sky gradient, a lit sphere, a soft shadow, faint grain."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width] / np.float64(max(width, height))
    sphere = np.clip(1 - ((x - 0.45) ** 2 + (y - 0.4) ** 2) / 0.06, 0, 1) ** 0.5
    shadow = np.exp(-((x - 0.55) ** 2 * 20 + (y - 0.75) ** 2 * 80))
    rgb = np.stack([0.3 + 0.5 * y + 0.6 * sphere, 0.4 + 0.3 * x + 0.3 * sphere, 0.8 - 0.4 * y + 0.1 * sphere], -1)
    rgb = (rgb * (1 - 0.5 * shadow[..., None])) * 255 + rng.normal(0, 2, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def soft_mask(width: int, height: int) -> Image.Image:
    """Grey levels everywhere: a left-to-right ramp under a feathered disc (mode L)."""
    y, x = np.mgrid[0:height, 0:width] / np.float64(max(width, height))
    disc = np.clip((0.25 - np.hypot(x - 0.6, y - 0.45)) / 0.12, 0, 1)
    return Image.fromarray(np.clip(255 * np.maximum(0.8 * x, disc), 0, 255).astype(np.uint8), "L")


@pytest.fixture(scope="module")
def sd(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=2)


@pytest.fixture(scope="module")
def refs(tiny_model_dir):
    return {mode: load_reference(tiny_model_dir, mode) for mode in ("img2img", "inpaint")}


def _diffusers(pipe, scheduler, seed, **kwargs) -> np.ndarray:
    use_scheduler(pipe, scheduler)
    with torch.no_grad():
        out = pipe(prompt=PROMPT, output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return np.asarray(out.images, np.float32)


def _check(result, expected):
    assert result.unit_images.shape == expected.shape
    error = float(np.abs(result.unit_images - expected).max())
    assert error <= BOUND, f"max abs {error:.3e} > {BOUND}"
    assert float(expected.std()) > 1e-3


def test_inputs_are_what_the_name_says():
    image, mask = photo(*SIZE), np.asarray(soft_mask(*SIZE))
    assert image.size == SIZE and default_size(image) == (200, 152)
    grey = (mask > 10) & (mask < 245)
    assert grey.mean() > 0.5 and len(np.unique(mask)) > 100  # mostly grey, many levels


@pytest.mark.parametrize("scheduler, batch", [("Euler a", 2), ("DPM++ 2M Karras", 1)])
def test_img2img_photo_sized_input(sd, refs, scheduler, batch):
    """No size given: both pipelines round 203x157 down to 200x152 and resize the picture to it."""
    image = photo(*SIZE)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5, strength=0.6,
                  num_images_per_prompt=batch)
    expected = _diffusers(refs["img2img"], scheduler, 21, image=image, **kwargs)
    result = sd.img2img(image, PROMPT, strength=0.6, negative_prompt="blurry", steps=5, guidance=7.5, seed=21,
                        batch=batch, scheduler=scheduler)
    assert (result.parameters["width"], result.parameters["height"]) == (200, 152)
    _check(result, expected)


@pytest.mark.parametrize("scheduler, strength, size", [
    ("Euler a", 1.0, None),             # sdrt's default size, 200x152 (passed to diffusers)
    ("DPM++ 2M Karras", 0.7, (128, 96)),  # another aspect ratio: image and mask resized to 128x96
    ("DDIM", 0.8, (96, 160)),
])
def test_inpaint_photo_sized_input_soft_mask(sd, refs, scheduler, strength, size):
    image, mask = photo(*SIZE), soft_mask(*SIZE)
    dims = {} if size is None else {"width": size[0], "height": size[1]}
    width, height = size or default_size(image)
    expected = _diffusers(refs["inpaint"], scheduler, 31, image=image, mask_image=mask, strength=strength,
                          num_inference_steps=5, guidance_scale=7.5, negative_prompt="ugly", width=width,
                          height=height)
    result = sd.inpaint(image, mask, PROMPT, strength=strength, negative_prompt="ugly", steps=5, guidance=7.5,
                        seed=31, scheduler=scheduler, **dims)
    assert (result.parameters["width"], result.parameters["height"]) == (size or (200, 152))
    _check(result, expected)


def test_soft_mask_is_binarized_like_diffusers():
    """The mask sdrt hands the UNet equals diffusers' mask processor output on the same grey mask."""
    from diffusers.image_processor import VaeImageProcessor

    from sdrt.images import preprocess_image, preprocess_mask

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    for width, height in ((200, 152), (128, 96)):
        want = processor.preprocess(soft_mask(*SIZE), height=height, width=width).numpy()
        got = preprocess_mask(soft_mask(*SIZE), width, height)
        assert got.shape == want.shape and np.array_equal(got, want)
        assert 0.1 < got.mean() < 0.9
        want = VaeImageProcessor(vae_scale_factor=8).preprocess(photo(*SIZE), height=height, width=width).numpy()
        assert np.abs(preprocess_image(photo(*SIZE), width, height) - want).max() <= 1e-6
