"""ControlNet on the SDXL layout (tiny-sdxl): residual count from the config, text_embeds/time_ids into the net,
parity with ``StableDiffusionXLControlNetPipeline`` and its img2img / inpaint variants, and ``sdrt verify``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.manifest import load_manifest
from sdrt.pipeline import Pipeline
from sdrt.specs import SizeRange, control_residuals
from sdrt_export import controlnet as cn
from sdrt_export.exporter import export_model
from sdrt_export.wrappers import read_json

BOUND = 1e-4
PROMPT = "a photo of a cat"


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.05
    rgb = np.stack([x, y, disc], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def net(tiny_sdxl_model_dir, tmp_path_factory):
    return cn.write_random_controlnet(tiny_sdxl_model_dir, tmp_path_factory.mktemp("sdxl-cn") / "net", seed=3)


@pytest.fixture(scope="module")
def artifact(tiny_sdxl_model_dir, net, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-cn-engines") / "engines"
    export_model(tiny_sdxl_model_dir, out, sizes=SizeRange(64, 64, 128, 2), progress=False, controlnet_dirs=[net])
    return out


@pytest.fixture(scope="module")
def sd(artifact):
    return Pipeline(artifact, threads=2)


def test_sdxl_controlnet_takes_the_added_conditioning_and_gives_the_sdxl_residuals(artifact, tiny_sdxl_model_dir):
    manifest = load_manifest(artifact)
    spec = manifest.specs["controlnet_0"]
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                "conditioning_scale", "text_embeds", "time_ids"]
    layout = cn.residual_layout(read_json(tiny_sdxl_model_dir / "unet" / "config.json"))
    assert len(control_residuals(manifest.dims)) == len(layout) == len(spec.outputs)
    assert manifest.dims.control_residuals == layout


@pytest.mark.slow
@pytest.mark.parametrize("mode, control", [
    ("txt2img", dict()),
    ("txt2img", dict(control_scales=0.7, control_start=0.25, control_end=0.75, guess_mode=True)),
    ("img2img", dict(control_scales=0.8)),
    ("inpaint", dict(guess_mode=True)),
], ids=["txt2img", "txt2img-guess-start-end", "img2img", "inpaint-guess"])
def test_sdxl_parity(sd, tiny_sdxl_model_dir, net, mode, control):
    width, height = 64, 64
    request = dict(steps=4, guidance=5.0, seed=2, width=width, height=height)
    extra = {}
    if mode != "txt2img":
        extra = {"image": picture(width, height, 7), "strength": 0.6 if mode == "img2img" else 0.9999}
    if mode == "inpaint":
        mask = np.zeros((height, width), np.uint8)
        mask[:, width // 3:] = 255
        extra["mask"] = Image.fromarray(mask)
    images = [picture(width, height, 1)]
    got = getattr(sd, mode)(prompt=PROMPT, control_images=images, **control, **request, **extra)
    reference = cn.load_reference(tiny_sdxl_model_dir, [net], mode)
    want = cn.reference_images(reference, mode, PROMPT, control_images=images, **control, **request, **extra)
    error = float(np.abs(got.unit_images - want).max())
    assert error <= BOUND, error
    plain = getattr(sd, mode)(prompt=PROMPT, **request, **extra)
    assert float(np.abs(plain.unit_images - got.unit_images).max()) > 1e-3  # the control image acted


@pytest.mark.slow
def test_verify_controlnet_cli(artifact, tiny_sdxl_model_dir, net, capsys):
    code = main(["verify", "--model", str(tiny_sdxl_model_dir), "--engines", str(artifact), "--steps", "2",
                 "--width", "64", "--height", "64", "--controlnet", str(net), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    report = json.loads(out)
    assert report["image_max_abs"] <= BOUND and not report["failed"]
    assert {"controlnet_0", "unet_control"} <= set(report["stages_rel_l2"])
