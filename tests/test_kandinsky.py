"""Kandinsky 2.2 at run time: sdrt's images against diffusers' combined pipelines, computed here (fp32, tiny
random-weight models from `sdrt make-model --arch tiny-kandinsky22[-inpaint]`, same CPU seed).

Bar: image max abs <= 1e-4 in [0, 1], at diffusers' default guidance 4.0 in both stages and >= 3 decoder steps. The
tiny decoder UNet is conditioned like a trained eps model (export/kandinsky_make.py), so its latents stay O(1)
across steps instead of growing up to 1 / sqrt(alpha_bar) and amplifying float32 differences.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdrt.errors import Cancelled, ImageInputError, InputError
from sdrt.pipeline import Pipeline
from sdrt.pipelines.kandinsky import KandinskyPipeline, downscale_height_and_width, prepare_mask

ATOL = 1e-4
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def k22(kandinsky_exports):
    """(model folder, ENGINE_DIR, sdrt Pipeline) of tiny-kandinsky22 (sizes 64..128, batch 2; tests/conftest.py)."""
    model, engines = kandinsky_exports("tiny-kandinsky22")
    return model, engines, Pipeline(engines)


@pytest.fixture(scope="module")
def k22_inpaint(kandinsky_exports):
    model, engines = kandinsky_exports("tiny-kandinsky22-inpaint")
    return model, engines, Pipeline(engines)


_REFERENCES: dict = {}


def reference(model, mode):
    from sdrt_export.verify_kandinsky import load_reference

    key = (str(model), mode)
    if key not in _REFERENCES:
        _REFERENCES[key] = load_reference(model, mode)
    return _REFERENCES[key]


def expected(model, mode, **request):
    from sdrt_export.verify_kandinsky import reference_images

    return reference_images(reference(model, mode), mode, PROMPT, **request)


def check(result, want):
    assert result.unit_images.shape == want.shape, (result.unit_images.shape, want.shape)
    err = float(np.abs(result.unit_images - want).max())
    assert err <= ATOL, f"image max abs {err:.3g} > {ATOL}"


def picture(width, height, seed=0):
    from sdrt_export.verify import _inpaint_inputs

    return _inpaint_inputs(width, height, seed)


BASE = dict(steps=3, prior_steps=3, prior_guidance=4.0, guidance=4.0)
TXT2IMG = [  # (negative prompt, batch, width, height, decoder guidance, prior guidance)
    ("", 1, 64, 64, 4.0, 4.0), ("blurry", 2, 64, 100, 4.0, 4.0), ("", 2, 100, 100, 4.0, 4.0),
    ("blurry", 1, 128, 64, 4.0, 4.0), ("blurry", 2, 128, 128, 4.0, 4.0),
    ("blurry", 1, 128, 64, 4.0, 1.0), ("", 1, 64, 64, 1.0, 4.0)]  # prior CFG off; decoder CFG off


@pytest.mark.parametrize("negative,batch,width,height,guidance,prior_guidance", TXT2IMG)
def test_txt2img_parity(k22, negative, batch, width, height, guidance, prior_guidance):
    """KandinskyV22CombinedPipeline; 100 rounds up to 128 (downscale_height_and_width), as the output shows."""
    model, _, pipe = k22
    request = dict(BASE, negative_prompt=negative, batch=batch, width=width, height=height, guidance=guidance,
                   prior_guidance=prior_guidance, seed=11)
    result = pipe.txt2img(PROMPT, **request)
    check(result, expected(model, "txt2img", **request))
    h, w = downscale_height_and_width(height, width, 8)
    assert result.images.shape == (batch, h * 8, w * 8, 3)
    p = result.parameters
    assert (p["prior_steps"], p["prior_guidance"], p["width"], p["height"]) == (3, prior_guidance, w * 8, h * 8)


@pytest.mark.parametrize("negative,batch,side", [("", 1, 64), ("blurry", 2, 128)])
def test_img2img_parity(k22, negative, batch, side):
    """KandinskyV22Img2ImgCombinedPipeline at its default strength 0.3 (10 steps -> 3 run). Square sizes:
    diffusers passes (width, height) to ``VaeImageProcessor.preprocess(image, height, width)``, so its non-square
    img2img images come out transposed in shape; sdrt keeps width as width (checked below)."""
    model, _, pipe = k22
    image = picture(side, side)["image"]
    request = dict(BASE, steps=10, negative_prompt=negative, batch=batch, width=side, height=side, seed=5)
    result = pipe.img2img(image, PROMPT, **request)
    check(result, expected(model, "img2img", image=image, **request))
    assert result.parameters["strength"] == 0.3 and result.images.shape[1:3] == (side - side % 8,) * 2
    wide = pipe.img2img(picture(130, 64)["image"], PROMPT, **{**request, "width": None, "height": None})
    assert wide.images.shape[1:3] == (64, 128)  # the image's size rounded down to multiples of 64


@pytest.mark.slow
@pytest.mark.parametrize("negative,batch,width", [("", 1, 64), ("blurry", 2, 128)])
def test_inpaint_parity(k22_inpaint, negative, batch, width):
    """KandinskyV22InpaintCombinedPipeline: 9-channel decoder, inverted and dilated mask, blend each step."""
    model, _, pipe = k22_inpaint
    inputs = picture(width, 64, seed=2)
    request = dict(BASE, negative_prompt=negative, batch=batch, width=width, height=64, seed=3)
    result = pipe.inpaint(inputs["image"], inputs["mask"], PROMPT, **request)
    check(result, expected(model, "inpaint", **inputs, **request))


def test_per_image_seeds(k22):
    """seed=[a, b]: diffusers' list of generators without a negative prompt; with one, image k equals a
    batch-1 run with seed k (diffusers cannot take a list there: its prior draws 2x batch rows)."""
    model, _, pipe = k22
    request = dict(BASE, width=64, height=64)
    result = pipe.txt2img(PROMPT, seed=[3, 4], batch=2, **request)
    check(result, expected(model, "txt2img", seed=[3, 4], batch=2, **request))
    pair = pipe.txt2img(PROMPT, seed=[3, 4], batch=2, negative_prompt="blurry", **request)
    for k, seed in enumerate((3, 4)):
        alone = pipe.txt2img(PROMPT, seed=seed, negative_prompt="blurry", **request)
        np.testing.assert_allclose(pair.unit_images[k], alone.unit_images[0], rtol=0, atol=1e-5)
    assert pair.seeds == [3, 4]


def test_cuda_rng_order(k22, monkeypatch):
    """rng="cuda": diffusers fed the same CudaGenerator draws (its randn_tensor replaced) gives the same image,
    so both stages draw in diffusers' order from one generator (the generator itself: tests/test_rng_cuda.py)."""
    import diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 as dec
    import diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_prior as pri
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_unclip as unclip

    from sdrt.rng import CudaGenerator

    model, _, pipe = k22
    request = dict(BASE, negative_prompt="blurry", batch=2, width=64, height=64, seed=9)
    result = pipe.txt2img(PROMPT, rng="cuda", **request)
    source = CudaGenerator(9, sm_count=132)  # cuda = cuda:h100

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(source.randn(tuple(shape)))

    for module in (dec, pri, ddpm, unclip):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    check(result, expected(model, "txt2img", **request))
    assert result.parameters["rng"] == "cuda:h100"
    assert not np.allclose(result.unit_images, pipe.txt2img(PROMPT, **request).unit_images)


def test_pipeline_picks_the_family(k22):
    _, engines, pipe = k22
    assert isinstance(pipe, KandinskyPipeline) and pipe.has_prior
    assert pipe.DEFAULTS["steps"] == 100 and pipe.DEFAULTS["prior_steps"] == 25


def test_timings_and_callback(k22):
    _, _, pipe = k22
    seen = []
    result = pipe.txt2img(PROMPT, **BASE, seed=0, callback=lambda i, n, t, latents: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(6)]  # prior steps, then decoder steps, one count
    for stage in ("tokenize", "text_encoder", "prior", "unet", "vae_decode", "loop_overhead"):
        assert stage in result.timings, stage
    assert len(result.timings["prior"]) == 3 and len(result.timings["unet"]) == 3
    with pytest.raises(Cancelled):
        pipe.txt2img(PROMPT, **BASE, seed=0, callback=lambda i, n, t, latents: i < 3)


BAD = [({"steps": 0}, "steps"), ({"prior_steps": 1}, "prior_steps"), ({"prior_steps": 2.5}, "prior_steps"),
       ({"prior_guidance": -1.0}, "prior_guidance"), ({"guidance": float("nan")}, "guidance"),
       ({"batch": 3}, "batch"), ({"width": 1000}, "width"), ({"height": 0}, "height"), ({"vae": "tiny"}, "vae"),
       ({"seed": [1, 2, 3], "batch": 2}, "seeds"), ({"loras": [("x.safetensors", 1.0)]}, "loras"),
       ({"scheduler": "Euler b"}, "scheduler"), ({"rng": "tpu"}, "rng"), ({"steps": 1001}, "steps")]


@pytest.mark.parametrize("options,match", BAD, ids=[m for _, m in BAD])
def test_bad_txt2img_inputs(k22, options, match):
    _, _, pipe = k22
    with pytest.raises(InputError, match=match):
        pipe.txt2img(PROMPT, **{**BASE, "seed": 0, **options})


def test_bad_image_inputs(k22, k22_inpaint, tmp_path):
    _, _, pipe = k22
    _, _, inpainter = k22_inpaint
    inputs = picture(64, 64)
    with pytest.raises(InputError, match="strength"):
        pipe.img2img(inputs["image"], PROMPT, strength=0.0, **BASE)
    with pytest.raises(InputError, match="multiples of 64"):  # latent 12: the exported UNet needs multiples of 8
        pipe.img2img(picture(96, 96)["image"], PROMPT, width=100, height=96, **BASE)
    with pytest.raises(InputError, match="no denoising step"):
        pipe.img2img(inputs["image"], PROMPT, strength=0.1, **BASE)
    with pytest.raises(InputError, match="inpainting decoder"):
        pipe.inpaint(inputs["image"], inputs["mask"], PROMPT, **BASE)
    with pytest.raises(InputError, match="inpainting model"):
        inpainter.txt2img(PROMPT, **BASE)
    with pytest.raises(InputError, match="multiples of 64"):
        inpainter.inpaint(picture(100, 64)["image"], picture(100, 64)["mask"], PROMPT, width=100, **BASE)
    with pytest.raises(InputError, match="strength"):
        inpainter.inpaint(inputs["image"], inputs["mask"], PROMPT, strength=0.5, **BASE)
    with pytest.raises(ImageInputError):
        inpainter.inpaint(inputs["image"], picture(128, 64)["mask"], PROMPT, **BASE)
    with pytest.raises(ImageInputError):
        pipe.img2img(tmp_path / "missing.png", PROMPT, **BASE)


def test_prepare_mask_matches_diffusers():
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask as reference_mask

    mask = (np.random.default_rng(0).uniform(size=(2, 1, 9, 7)) > 0.3).astype(np.float32)
    np.testing.assert_array_equal(prepare_mask(mask), reference_mask(torch.from_numpy(mask.copy())).numpy())


def test_downscale_matches_diffusers():
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width as reference_size

    for h, w, s in ((512, 512, 8), (500, 768, 8), (100, 65, 8), (64, 63, 2)):
        assert downscale_height_and_width(h, w, s) == reference_size(h, w, s)


@pytest.mark.slow
def test_cli_defaults_and_prior_flags(k22, tmp_path, capsys):
    """Without --steps/--guidance the decoder runs diffusers' 100 steps at 4.0 (prior 25 at 4.0); the PNG
    carries the parameters."""
    from PIL import Image

    from sdrt.cli import main

    _, engines, _ = k22
    out = tmp_path / "cat.png"
    assert main(["txt2img", "--engines", str(engines), "--prompt", PROMPT, "--seed", "1", "--out", str(out),
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["parameters"]
    assert (p["steps"], p["guidance"], p["prior_steps"], p["prior_guidance"]) == (100, 4.0, 25, 4.0)
    text = Image.open(out).info["parameters"]
    assert "Steps: 100" in text and "Prior steps: 25" in text and "Prior CFG scale: 4.0" in text
    assert main(["txt2img", "--engines", str(engines), "--prompt", PROMPT, "--prior-steps", "2", "--prior-guidance",
                 "1.5", "--steps", "2", "--out", str(tmp_path / "b.png"), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["parameters"]
    assert (p["steps"], p["prior_steps"], p["prior_guidance"]) == (2, 2, 1.5)
    assert main(["txt2img", "--engines", str(engines), "--prompt", PROMPT, "--prior-steps", "1",
                 "--out", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


def test_cli_prior_flags_refused_elsewhere():
    from sdrt.generate_cli import request_options

    args = SimpleNamespace(steps=None, guidance=None, prior_steps=5, prior_guidance=None)
    with pytest.raises(InputError, match="--prior-steps"):
        request_options(args, SimpleNamespace(dims=SimpleNamespace(family="sd15")))
    assert request_options(SimpleNamespace(steps=3, guidance=None), SimpleNamespace()) == {"steps": 3}


def test_verify_per_stage(k22, capsys):
    """`sdrt verify` on the family: prior embedding, one decoder step, MoVQ decode/encode, the image; also with
    the two published folders (--model DECODER --prior PRIOR)."""
    from sdrt.cli import main

    model, engines, _ = k22
    assert main(["verify", "--model", str(model / "decoder"), "--prior", str(model / "prior"), "--engines",
                 str(engines), "--steps", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["stages_rel_l2"]) == {"prior_image_embeds", "negative_image_embeds", "unet_step", "movq_decode",
                                            "movq_encode"}
    assert not report["failed"] and report["image_max_abs"] <= ATOL


@pytest.mark.slow
def test_bench_runs_the_family(k22, tmp_path):
    """`sdrt bench` on a Kandinsky artifact: the shared stages and the prior's calls."""
    from sdrt.cli import main

    _, engines, _ = k22
    out = tmp_path / "bench.json"
    assert main(["bench", "--engines", str(engines), "--steps", "2", "--runs", "1", "--warmup", "0", "--width", "64",
                 "--height", "64", "--json", str(out)]) == 0
    text = out.read_text()
    for stage in ("prior_call", "unet_call", "vae_decode", "end_to_end"):
        assert f'"{stage}"' in text, stage
