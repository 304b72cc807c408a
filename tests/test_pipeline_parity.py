"""End-to-end parity: sdrt (ONNX Runtime, numpy) vs the diffusers pipelines (torch, fp32), same seed.

The bound is the issue's: image max abs <= 1e-4 in [0, 1], for every scheduler, square and
non-square sizes, batch 1 and 2, with and without a negative prompt; img2img and inpaint likewise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt import schedulers
from sdrt.pipeline import Pipeline
from sdrt_export.verify import load_reference, reference_images, use_scheduler

BOUND = 1e-4
PROMPT = "a photo of a cat sitting on a red sofa"
SCHEDULERS = list(schedulers.CLASSES)
CASES = [
    dict(width=64, height=64, batch=1, negative_prompt="blurry, low quality", seed=7),
    dict(width=96, height=64, batch=2, negative_prompt="", seed=1234),
]


def test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture with structure (gradients, a disc) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.08).astype(float)
    rgb = np.stack([x, y, disc], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    return Image.fromarray(rgb.astype(np.uint8))


def test_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 3: width] = 255
    return Image.fromarray(mask)


test_image.__test__ = test_mask.__test__ = False  # helpers, not tests


@pytest.fixture(scope="module")
def sd(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=2)


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    return {mode: load_reference(tiny_model_dir, mode) for mode in ("txt2img", "img2img", "inpaint")}


def compare(sd_pipe, ref_pipe, mode, scheduler, steps=5, guidance=7.5, **case):
    use_scheduler(ref_pipe, scheduler)
    case = dict(case)
    kwargs = dict(negative_prompt=case.pop("negative_prompt", ""), steps=steps, guidance=guidance,
                  seed=case.pop("seed", 0), width=case["width"], height=case["height"], batch=case.get("batch", 1))
    inputs = {k: case[k] for k in ("image", "mask", "strength") if k in case}
    expected = reference_images(ref_pipe, mode, PROMPT, **kwargs, **inputs)
    result = getattr(sd_pipe, mode)(prompt=PROMPT, scheduler=scheduler, **kwargs, **inputs)
    assert result.unit_images.shape == expected.shape
    error = float(np.abs(result.unit_images - expected).max())
    assert error <= BOUND, f"{mode} {scheduler}: max abs {error:.3e} > {BOUND}"
    # the check is not vacuous: outputs vary with the request
    assert float(expected.std()) > 1e-3
    return result


@pytest.mark.parametrize("case", CASES, ids=["64x64-b1-neg", "96x64-b2"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_txt2img(sd, references, scheduler, case):
    compare(sd, references["txt2img"], "txt2img", scheduler, **case)


def test_txt2img_model_default_scheduler(sd, references, tiny_model_dir):
    references["txt2img"].scheduler = load_reference(tiny_model_dir).scheduler  # the model's PNDM
    compare(sd, references["txt2img"], "txt2img", None, width=64, height=72, seed=3)


@pytest.mark.parametrize("guidance", [1.0, 0.0])
@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DDIMScheduler"])
def test_txt2img_without_cfg(sd, references, scheduler, guidance):
    compare(sd, references["txt2img"], "txt2img", scheduler, guidance=guidance, width=64, height=64, seed=5)


def test_seed_changes_image(sd):
    a = sd.txt2img(PROMPT, steps=3, seed=1, width=64, height=64).unit_images
    b = sd.txt2img(PROMPT, steps=3, seed=2, width=64, height=64).unit_images
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_img2img(sd, references, scheduler):
    index = SCHEDULERS.index(scheduler)
    width, height, batch = (64, 64, 1) if index % 2 else (96, 64, 2)
    compare(sd, references["img2img"], "img2img", scheduler, steps=6, width=width, height=height, batch=batch,
            image=test_image(width, height, index), strength=0.6, negative_prompt="ugly" if index % 3 else "",
            seed=100 + index)


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                       "DDIMScheduler", "PNDMScheduler"])
def test_inpaint_ordinary_unet(sd, references, scheduler, strength):
    width, height = (64, 64) if strength == 1.0 else (96, 64)
    compare(sd, references["inpaint"], "inpaint", scheduler, steps=5, width=width, height=height,
            batch=1 if strength == 1.0 else 2, image=test_image(width, height, 3), mask=test_mask(width, height),
            strength=strength, negative_prompt="blurry", seed=77)


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    from sdrt.specs import SizeRange
    from sdrt_export.exporter import export_model
    from sdrt_export.make_model import make_model

    root = tmp_path_factory.mktemp("inpaint")
    model = make_model(root / "model", arch="tiny-inpaint", seed=1)
    engines = export_model(model, root / "engines", sizes=SizeRange(64, 64, 128, 2), progress=False)
    assert engines
    return model, root / "engines"


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler", "LCMScheduler"])
def test_inpaint_nine_channel_unet(inpaint_model, scheduler, strength):
    model, engines = inpaint_model
    sd_pipe = Pipeline(engines)
    assert sd_pipe.dims.unet_in_channels == 9
    width, height = 64, 96
    compare(sd_pipe, load_reference(model, "inpaint"), "inpaint", scheduler, steps=4, width=width, height=height,
            batch=2 if strength == 1.0 else 1, image=test_image(width, height, 9), mask=test_mask(width, height),
            strength=strength, negative_prompt="", seed=11)


# ---------------------------------------------------------------- `make demo`'s path: ort-cpu optimized graphs

DEMO_PROMPT = "a photo of a cat"  # the Makefile's demo request: 20 steps, seed 42, 256x256, the model's scheduler


@pytest.fixture(scope="module")
def demo_engines(tiny_model_dir, tiny_engine_dir, tmp_path_factory):
    """`make demo`'s artifact: the export, then `sdrt build-engines --backend ort-cpu` (the CLI)."""
    import shutil

    from sdrt.cli import main

    out = shutil.copytree(tiny_engine_dir, tmp_path_factory.mktemp("demo") / "tiny")
    assert main(["build-engines", "--model", str(tiny_model_dir), "--out", str(out), "--backend", "ort-cpu",
                 "--json"]) == 0
    return out


@pytest.fixture
def opened_graphs(monkeypatch):
    """The ONNX files the ORT engines are opened on, in order."""
    from sdrt.backends import ort as ort_backend

    paths, real = [], ort_backend.OrtEngine

    class Spy(real):
        def __init__(self, path, *args, **kwargs):
            paths.append(Path(path).resolve())
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(ort_backend, "OrtEngine", Spy)
    return paths


@pytest.mark.parametrize("scheduler, case", [
    (None, dict(width=256, height=256, steps=20, seed=42)),  # the demo's request
    ("DPM++ 2M Karras", dict(width=96, height=64, batch=2, steps=6, seed=9, negative_prompt="blurry")),
], ids=["demo", "karras-b2"])
def test_demo_path_image_matches_diffusers(demo_engines, references, tiny_model_dir, opened_graphs, scheduler, case):
    """The optimized graphs (fused MultiHeadAttention) give diffusers' image, not just per-component parity."""
    from sdrt.manifest import load_manifest

    manifest = load_manifest(demo_engines)
    optimized = {name: manifest.verified_engine("ort-cpu", name)[0].resolve() for name in manifest.specs.components}
    references["txt2img"].scheduler = load_reference(tiny_model_dir).scheduler  # the model's own PNDM
    sd_pipe = Pipeline(demo_engines, backend="ort-cpu", threads=2)
    compare(sd_pipe, references["txt2img"], "txt2img", scheduler, **case)
    assert set(opened_graphs) == {optimized["text_encoder"], optimized["unet"], optimized["vae_decoder"]}
    assert optimized["unet"] != manifest.verified_path("unet").resolve()  # not the exported ONNX


def test_demo_cli_with_backend_equals_the_python_api(demo_engines, tmp_path, capsys, opened_graphs):
    """`sdrt txt2img ... --backend ort-cpu` (the demo's command) writes the Python API's image."""
    import json

    from sdrt.cli import main

    out = tmp_path / "out" / "cat.png"
    code = main(["txt2img", "--engines", str(demo_engines), "--backend", "ort-cpu", "--prompt", DEMO_PROMPT,
                 "--steps", "20", "--seed", "42", "--width", "256", "--height", "256", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    cli_graphs = list(opened_graphs)
    api = Pipeline(demo_engines, backend="ort-cpu").txt2img(DEMO_PROMPT, steps=20, seed=42, width=256, height=256)
    assert cli_graphs == opened_graphs[len(cli_graphs):]  # both ran the same (optimized) graphs
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (256, 256, 3) and np.array_equal(png, api.images[0])
    assert float(api.unit_images.std()) > 1e-3
