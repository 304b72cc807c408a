"""The tiny VAE (TAESD, diffusers' AutoencoderTiny): make-model, export --tiny-vae, --vae tiny.

Parity: the image equals diffusers' pipeline after ``pipe.vae = AutoencoderTiny.from_pretrained(DIR)``
within the fp32 bound (max abs <= 1e-4 in [0, 1]), SD1.x txt2img / img2img / inpaint and SDXL txt2img.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdrt.errors import InputError, ModelError
from sdrt.manifest import load_manifest, sha256_file
from sdrt.pipeline import Pipeline
from sdrt.specs import TINY_VAE_DECODER, TINY_VAE_ENCODER, SizeRange
from sdrt_export.verify import load_reference, reference_images, use_scheduler

BOUND = 1e-4
PROMPT = "a photo of a cat sitting on a red sofa"


def picture(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, (x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.08], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    from sdrt_export.make_model import make_model

    return make_model(tmp_path_factory.mktemp("taesd") / "taesd", arch="taesd", seed=3)


@pytest.fixture(scope="module")
def sd_engines(tiny_model_dir, taesd, tmp_path_factory):
    from sdrt_export.exporter import export_model

    out = tmp_path_factory.mktemp("tiny-vae") / "engines"
    export_model(tiny_model_dir, out, sizes=SizeRange(64, 64, 128, 2), progress=False, tiny_vae_dir=taesd)
    return out


def with_tiny_vae(pipe, folder):
    from diffusers import AutoencoderTiny

    pipe.vae = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=torch.float32)
    return pipe


def compare(engines, reference, mode, scheduler, **case):
    use_scheduler(reference, scheduler)
    kwargs = dict(negative_prompt=case.pop("negative_prompt", ""), steps=case.pop("steps", 3),
                  guidance=case.pop("guidance", 7.5), seed=case.pop("seed", 0), width=case["width"],
                  height=case["height"], batch=case.get("batch", 1))
    inputs = {k: case[k] for k in ("image", "mask", "strength") if k in case}
    expected = reference_images(reference, mode, PROMPT, **kwargs, **inputs)
    sd = Pipeline(engines)
    tiny = getattr(sd, mode)(prompt=PROMPT, scheduler=scheduler, vae="tiny", **kwargs, **inputs)
    error = float(np.abs(tiny.unit_images - expected).max())
    assert error <= BOUND, f"{mode}: max abs {error:.3e} > {BOUND}"
    assert float(expected.std()) > 0.05  # images with content, not a clamped constant
    full = getattr(sd, mode)(prompt=PROMPT, scheduler=scheduler, **kwargs, **inputs)
    assert float(np.abs(full.unit_images - tiny.unit_images).max()) > 0.1  # the tiny VAE is what ran
    assert tiny.parameters["vae"] == "tiny" and full.parameters["vae"] == "full"
    return tiny


def test_make_model_taesd_is_the_real_config_and_not_degenerate(taesd, tmp_path):
    from diffusers import AutoencoderTiny

    from sdrt_export.make_model import make_model

    config = json.loads((taesd / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny"
    assert (config["latent_channels"], config["scaling_factor"], config["shift_factor"]) == (4, 1.0, 0.0)
    assert config["encoder_block_out_channels"] == config["decoder_block_out_channels"] == [64] * 4
    assert (config["num_encoder_blocks"], config["num_decoder_blocks"]) == ([1, 3, 3, 3], [3, 3, 3, 1])
    vae = AutoencoderTiny.from_pretrained(str(taesd)).eval()
    with torch.no_grad():
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        images = vae.decode(z).sample
        moved = vae.decode(z + 0.1 * torch.randn_like(z)).sample
        latents = vae.encode(images.clamp(-1, 1)).latents
    assert images.shape == (2, 3, 64, 64) and latents.shape == (2, 4, 8, 8)
    assert 0.2 < float(images.std()) < 0.8 and float(((images > -1) & (images < 1)).float().mean()) > 0.95
    assert float((images[0] - images[1]).abs().mean()) > 0.1  # the image depends on the latents
    assert float((images - moved).abs().mean()) > 0.01
    assert 0.3 < float(latents.std()) < 3
    xl = make_model(tmp_path / "taesdxl", arch="taesdxl", seed=3)
    assert json.loads((xl / "config.json").read_text()) == config
    assert sha256_file(xl / "diffusion_pytorch_model.safetensors") == \
        sha256_file(taesd / "diffusion_pytorch_model.safetensors")  # same seed, same bytes


def test_manifest_records_the_tiny_vae(sd_engines, taesd):
    manifest = load_manifest(sd_engines)
    for name, inputs, outputs in ((TINY_VAE_DECODER, ["latent"], ["images"]),
                                  (TINY_VAE_ENCODER, ["images"], ["latents"])):
        entry = manifest.component(name)
        assert (entry["inputs"], entry["outputs"], entry["format"]) == (inputs, outputs, "onnx")
        assert entry["check_error"] <= 1e-5
        manifest.verified_path(name)  # sha256 and size recorded and matching
        assert manifest.specs[name].tensor(inputs[0]).dynamic_axes  # batch/height/width dynamic
    section = manifest.data["tiny_vae"]
    assert section["scaling_factor"] == 1.0 and section["source"]["path"] == str(taesd.absolute())


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_txt2img_sd15(sd_engines, tiny_model_dir, taesd, scheduler):
    reference = with_tiny_vae(load_reference(tiny_model_dir, "txt2img"), taesd)
    compare(sd_engines, reference, "txt2img", scheduler, width=96, height=64, batch=2, seed=7,
            negative_prompt="blurry")


def test_img2img_sd15(sd_engines, tiny_model_dir, taesd):
    """No posterior draw: the first draw is the noise (diffusers' retrieve_latents takes ``.latents``)."""
    reference = with_tiny_vae(load_reference(tiny_model_dir, "img2img"), taesd)
    compare(sd_engines, reference, "img2img", "EulerAncestralDiscreteScheduler", steps=4, width=64, height=64,
            batch=2, image=picture(64, 64, 1), strength=0.6, seed=11)


def test_inpaint_sd15(sd_engines, tiny_model_dir, taesd):
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 32:] = 255
    from PIL import Image

    reference = with_tiny_vae(load_reference(tiny_model_dir, "inpaint"), taesd)
    compare(sd_engines, reference, "inpaint", "DDIMScheduler", steps=4, width=96, height=64,
            image=picture(96, 64, 2), mask=Image.fromarray(mask), strength=0.7, seed=5)


def test_txt2img_sdxl(tiny_sdxl_model_dir, tmp_path):
    from sdrt_export.exporter import export_model
    from sdrt_export.make_model import make_model

    taesdxl = make_model(tmp_path / "taesdxl", arch="taesdxl", seed=4)
    engines = tmp_path / "engines"
    export_model(tiny_sdxl_model_dir, engines, sizes=SizeRange(64, 64, 128, 1), progress=False, tiny_vae_dir=taesdxl)
    reference = with_tiny_vae(load_reference(tiny_sdxl_model_dir, "txt2img"), taesdxl)
    compare(engines, reference, "txt2img", "EulerDiscreteScheduler", width=64, height=96, seed=9)


def test_cli_vae_tiny_equals_the_api(sd_engines, tmp_path):
    from PIL import Image

    from sdrt.cli import main

    out = tmp_path / "cat.png"
    assert main(["txt2img", "--engines", str(sd_engines), "--prompt", PROMPT, "--steps", "2", "--seed", "3",
                 "--width", "64", "--height", "64", "--vae", "tiny", "--out", str(out), "--json"]) == 0
    api = Pipeline(sd_engines).txt2img(PROMPT, steps=2, seed=3, width=64, height=64, vae="tiny")
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), api.images[0])


def test_errors(tiny_engine_dir, tiny_model_dir, taesd, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt_export.exporter import export_model

    pipe = Pipeline(tiny_engine_dir)
    with pytest.raises(InputError, match="no tiny VAE.*sdrt export .*--tiny-vae"):
        pipe.txt2img(PROMPT, steps=1, width=64, height=64, vae="tiny")
    with pytest.raises(InputError, match="vae must be one of full, tiny"):
        pipe.txt2img(PROMPT, steps=1, width=64, height=64, vae="taesd")
    assert main(["txt2img", "--engines", str(tiny_engine_dir), "--prompt", "x", "--steps", "1", "--width", "64",
                 "--height", "64", "--vae", "tiny", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tiny-vae" in err and not (tmp_path / "x.png").exists()
    for bad, message in ((tmp_path / "missing", "does not exist"), (tiny_model_dir / "vae", "AutoencoderKL"),
                         (tiny_model_dir / "unet", "UNet2DConditionModel")):
        with pytest.raises(ModelError, match=message):
            export_model(tiny_model_dir, tmp_path / "out", progress=False, tiny_vae_dir=bad)
        assert not (tmp_path / "out").exists()
    wrong = tmp_path / "taesd16"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**json.loads((taesd / "config.json").read_text()),
                                                   "latent_channels": 16}))
    (wrong / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--tiny-vae",
                 str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16 latent channels" in err and not (tmp_path / "out").exists()


def test_c_abi_vae_field(sd_engines, tiny_engine_dir, tmp_path_factory, tmp_path):
    """sdrt_generate_params.vae: "tiny" gives the Python API's tiny-VAE pixels; NULL is "full"; an artifact
    without a tiny VAE is SDRT_ERR_INPUT with the one-line message."""
    import subprocess
    import sys

    import test_capi

    capi = tmp_path_factory.mktemp("capi")  # built as tests/test_capi.py's fixture builds it
    subprocess.run([sys.executable, str(test_capi.ROOT / "capi" / "build.py"), str(capi)], check=True,
                   capture_output=True)
    subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", f"-I{test_capi.ROOT / 'capi'}",
                    str(test_capi.ROOT / "tests" / "capi" / "capi_test.c"), "-o", str(capi / "capi_test"),
                    f"-L{capi}", f"-Wl,-rpath,{capi}", "-lsdrt", "-lpthread"], check=True)
    results, _, stderr = test_capi.run(capi, tmp_path, [
        test_capi.cmd("open", 0, engine_dir=sd_engines, threads=1),
        test_capi.cmd("gen", 0, seed=4, width=64, height=64, steps=2, vae="tiny", out=tmp_path / "t"),
        test_capi.cmd("gen", 0, seed=4, width=64, height=64, steps=2, out=tmp_path / "f"),
        test_capi.cmd("open", 1, engine_dir=tiny_engine_dir, threads=1),
        test_capi.cmd("gen", 1, seed=4, width=64, height=64, steps=2, vae="tiny", out=tmp_path / "x"),
        test_capi.cmd("close", 0), test_capi.cmd("close", 1)])
    assert stderr == ""
    assert [r["status"] for r in results] == [0, 0, 0, 0, 2, 0, 0], results
    assert "--tiny-vae" in results[4]["error"] and "\n" not in results[4]["error"]
    pipe = Pipeline(sd_engines)
    for prefix, vae in (("t", "tiny"), ("f", "full")):
        want = pipe.txt2img("a photo of a cat", seed=4, width=64, height=64, steps=2, vae=vae).images[0]
        assert np.array_equal(test_capi.ppm(tmp_path / f"{prefix}-0.ppm"), want), vae


@pytest.mark.slow
def test_fp16_export_covers_the_tiny_vae(tiny_model_dir, taesd, sd_engines, tmp_path):
    """--precision fp16 exports the tiny VAE in fp16 too (checked against torch fp32 at export); the image
    stays within the fp16 image bound of the fp32 artifact's (itself diffusers' within 1e-4)."""
    from sdrt_export.exporter import export_model

    engines = tmp_path / "fp16"
    export_model(tiny_model_dir, engines, sizes=SizeRange(64, 64, 128, 1), progress=False, precision="fp16",
                 tiny_vae_dir=taesd)
    manifest = load_manifest(engines)
    assert {manifest.component(n)["precision"] for n in (TINY_VAE_DECODER, TINY_VAE_ENCODER)} == {"fp16"}
    request = dict(steps=3, seed=2, width=64, height=64, vae="tiny", scheduler="EulerAncestralDiscreteScheduler")
    half = Pipeline(engines).img2img(picture(64, 64, 4), PROMPT, strength=0.8, **request).unit_images
    full = Pipeline(sd_engines).img2img(picture(64, 64, 4), PROMPT, strength=0.8, **request).unit_images
    error = float(np.abs(half - full).max())
    assert error <= 2e-2, error


def test_serve_jobs_vae_field(sd_engines):
    """sdrt serve's POST /v1/jobs takes "vae": "tiny" (the Python API's pixels); another value is a 4xx."""
    pytest.importorskip("fastapi")
    import httpx

    from sdrt.serve.executor import LocalExecutor
    from tests.serve_fixtures import ThreadServer, pixels, wait_until

    server = ThreadServer(LocalExecutor(str(sd_engines), threads=1))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = {"prompt": PROMPT, "steps": 2, "seed": 6, "width": 64, "height": 64, "vae": "tiny"}
            job = client.post("/v1/jobs", json=body).json()
            wait_until(lambda: client.get(job["status_url"]).json()["state"] in ("succeeded", "failed"), 120,
                       interval=0.2, what="job done")
            assert client.get(job["status_url"]).json()["state"] == "succeeded"
            image = pixels(client.get(f"/v1/jobs/{job['id']}/images/0.png").content)
            bad = client.post("/v1/jobs", json={**body, "vae": "taesd"})
            assert 400 <= bad.status_code < 500 and "vae" in bad.text
    finally:
        server.close()
    want = Pipeline(sd_engines).txt2img(PROMPT, steps=2, seed=6, width=64, height=64, vae="tiny").images[0]
    assert np.array_equal(image, want)
