"""Per-image seeds (``seed=[s0, s1, ...]``) against diffusers with a list of CPU generators, live.

Each image of a batch draws everything (initial noise, VAE posterior samples, ancestral step noise) from
its own generator, so image k equals a batch-1 run with seed s_k; that is what A1111's ``seed + k``
needs. diffusers' inpaint pipeline samples the VAE posterior of a single input image from generator[0]
only, so the inpaint reference gets one copy of the image (and mask) per generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.errors import InputError
from sdrt.pipeline import Pipeline
from sdrt_export.verify import load_reference, use_scheduler
from tests.test_pipeline_parity import PROMPT, test_image, test_mask

BOUND = 1e-4
SEEDS = [11, 4242]


@pytest.fixture(scope="module")
def sd(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=2)


def diffusers_images(model_dir, mode, scheduler, seeds, **kwargs) -> np.ndarray:
    pipe = load_reference(model_dir, mode)
    use_scheduler(pipe, scheduler)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=kwargs.pop("steps"),
                   guidance_scale=7.5, num_images_per_prompt=len(seeds), output_type="np", generator=generators,
                   **kwargs)
    return np.asarray(out.images, np.float32)


CASES = {
    "txt2img-euler-a": ("txt2img", "EulerAncestralDiscreteScheduler", {}),
    "txt2img-ddpm": ("txt2img", "DDPMScheduler", {}),
    "img2img-euler-a": ("img2img", "EulerAncestralDiscreteScheduler", {"strength": 0.6}),
    "inpaint-euler-a": ("inpaint", "EulerAncestralDiscreteScheduler", {"strength": 0.7}),
    "inpaint-full-strength": ("inpaint", "DPMSolverMultistepScheduler", {"strength": 1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_seed_list_matches_diffusers_generator_list(sd, tiny_model_dir, case):
    mode, scheduler, extra = CASES[case]
    width, height, steps = 64, 64, 4
    image, mask = test_image(width, height, 5), test_mask(width, height)
    ref_kwargs, sd_kwargs = dict(steps=steps, **extra), dict(extra)
    if mode == "txt2img":
        ref_kwargs.update(width=width, height=height)
    elif mode == "img2img":
        ref_kwargs["image"] = image
        sd_kwargs["image"] = image
    else:
        ref_kwargs.update(image=[image] * len(SEEDS), mask_image=[mask] * len(SEEDS), width=width, height=height)
        sd_kwargs.update(image=image, mask=mask)
    expected = diffusers_images(tiny_model_dir, mode, scheduler, SEEDS, **ref_kwargs)
    common = dict(prompt=PROMPT, negative_prompt="blurry", steps=steps, guidance=7.5, width=width, height=height,
                  scheduler=scheduler, **sd_kwargs)
    result = getattr(sd, mode)(seed=list(SEEDS), batch=len(SEEDS), **common)
    assert result.seeds == SEEDS and result.seed == SEEDS[0]
    error = float(np.abs(result.unit_images - expected).max())
    assert error <= BOUND, f"{case}: max abs {error:.3e} > {BOUND}"
    assert float(np.abs(expected[0] - expected[1]).max()) > 1e-2  # the seeds differ, so do the images
    # image k of the batch is the batch-1 image of seed k
    alone = getattr(sd, mode)(seed=SEEDS[1], batch=1, **common)
    error = float(np.abs(result.unit_images[1] - alone.unit_images[0]).max())
    assert error <= BOUND, f"{case}: image 1 of the batch differs from seed {SEEDS[1]} alone by {error:.3e}"


def test_seed_list_length_must_match_batch(sd):
    with pytest.raises(InputError, match="2 seeds given for a batch of 1"):
        sd.txt2img(PROMPT, steps=1, seed=[1, 2], batch=1, width=64, height=64)
    with pytest.raises(InputError, match="seed must be an integer"):
        sd.txt2img(PROMPT, steps=1, seed=[1, "x"], batch=2, width=64, height=64)


def test_one_seed_list_is_that_seed(sd):
    a = sd.txt2img(PROMPT, steps=2, seed=[9], width=64, height=64, scheduler="Euler a").images
    b = sd.txt2img(PROMPT, steps=2, seed=9, width=64, height=64, scheduler="Euler a").images
    np.testing.assert_array_equal(a, b)
