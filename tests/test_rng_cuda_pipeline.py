"""``rng="cuda:GPU"`` through the whole pipeline: sdrt seeded with torch's CUDA generator equals diffusers fed
the same draws. No GPU is needed: diffusers gets ``CudaGenerator``'s initial latents as ``latents=`` and its
step noise through the scheduler's ``randn_tensor`` (the one place Euler a draws), so the test checks the
plumbing (which generator, draw order, offsets across draws) where the generator itself cannot be compared
with torch (tests/test_rng_cuda.py does that on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.errors import InputError
from sdrt.pipeline import Pipeline
from sdrt.rng import CudaGenerator, TorchGenerator
from sdrt_export.verify import load_reference, use_scheduler

BOUND = 1e-4
PROMPT = "a photo of a cat sitting on a red sofa"


@pytest.fixture(scope="module")
def sd(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=2)


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    return load_reference(tiny_model_dir, "txt2img")


def _diffusers_with_cuda_draws(pipe, monkeypatch, gpu: str, seed: int, batch: int, steps: int, size: int):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a

    use_scheduler(pipe, "Euler a")
    gen = CudaGenerator.for_gpu(seed, gpu)
    shape = (batch, 4, size // 8, size // 8)
    latents = torch.from_numpy(gen.randn(shape))
    draws = []

    def cuda_randn(shape, generator=None, device=None, dtype=None, layout=None):
        draws.append(tuple(shape))
        return torch.from_numpy(gen.randn(tuple(shape))).to(dtype)

    monkeypatch.setattr(euler_a, "randn_tensor", cuda_randn)
    with torch.no_grad():
        out = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=batch,
                   width=size, height=size, latents=latents, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(0))  # unused: every draw is injected
    assert len(draws) == steps  # one step-noise draw per step came from the CUDA generator
    return np.asarray(out.images, np.float32)


@pytest.mark.parametrize("gpu,batch", [("h100", 1), ("t4", 2)])
def test_cuda_rng_image_equals_diffusers_fed_the_same_draws(sd, ref, monkeypatch, gpu, batch):
    steps, size, seed = 4, 64, 31
    expected = _diffusers_with_cuda_draws(ref, monkeypatch, gpu, seed, batch, steps, size)
    result = sd.txt2img(PROMPT, steps=steps, guidance=7.5, seed=seed, width=size, height=size, batch=batch,
                        scheduler="Euler a", rng=f"cuda:{gpu}")
    assert result.parameters["rng"] == f"cuda:{gpu}"
    assert np.abs(result.unit_images - expected).max() <= BOUND
    # and the source matters: the CPU generator's image is far from it
    cpu = sd.txt2img(PROMPT, steps=steps, guidance=7.5, seed=seed, width=size, height=size, batch=batch,
                     scheduler="Euler a")
    assert np.abs(cpu.unit_images - expected).max() > 100 * BOUND


def test_default_rng_is_torch_cpu(sd):
    result = sd.txt2img(PROMPT, steps=2, seed=5, width=64, height=64, scheduler="Euler")
    again = sd.txt2img(PROMPT, steps=2, seed=5, width=64, height=64, scheduler="Euler", rng="cpu")
    assert result.parameters["rng"] == "cpu"
    np.testing.assert_array_equal(result.images, again.images)
    assert isinstance(TorchGenerator(5), TorchGenerator)


def test_seed_list_with_cuda_rng_gives_each_image_its_own_generator(sd):
    pair = sd.txt2img(PROMPT, steps=3, seed=[3, 4], width=64, height=64, batch=2, scheduler="Euler a",
                      rng="cuda:a100")
    for k, s in enumerate((3, 4)):
        alone = sd.txt2img(PROMPT, steps=3, seed=s, width=64, height=64, scheduler="Euler a", rng="cuda:a100")
        assert np.abs(pair.unit_images[k] - alone.unit_images[0]).max() <= 1e-5


def test_bad_rng_is_an_input_error(sd):
    with pytest.raises(InputError, match="rng"):
        sd.txt2img(PROMPT, steps=1, seed=0, width=64, height=64, rng="cuda:nonexistent-gpu")
    with pytest.raises(InputError, match="rng"):
        sd.txt2img(PROMPT, steps=1, seed=0, width=64, height=64, rng="mps")


def test_cli_records_nv_rng_in_the_png(tiny_engine_dir, tmp_path, capsys):
    from sdrt.cli import main

    out = tmp_path / "nv.png"
    assert main(["txt2img", "--engines", str(tiny_engine_dir), "--prompt", PROMPT, "--steps", "2", "--seed", "31",
                 "--width", "64", "--height", "64", "--rng", "cuda:4090", "--out", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    assert "RNG: NV" in text and "sdrt RNG: cuda:4090" in text
    assert main(["txt2img", "--engines", str(tiny_engine_dir), "--prompt", PROMPT, "--steps", "1",
                 "--rng", "gpu", "--out", str(tmp_path / "x.png")]) == 2
    assert "rng" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
