"""Model families end to end: make-model -> export -> runtime, parity with the matching diffusers pipeline.

SD2.x (v-prediction DDIM and epsilon PNDM), SD-Turbo (Euler a, trailing, guidance 0), LCM
(``LatentConsistencyModelPipeline``, guidance through ``timestep_cond``) and SDXL (two text
encoders, pooled embeds and time ids; inpainting as ``StableDiffusionXLInpaintPipeline`` with the
base 4-channel UNet and a 9-channel inpainting UNet): image max abs <= 1e-4 vs diffusers, same seed,
for each family's own scheduler config and a couple of others, square and non-square, batch 1 and 2.

Every arch is exported from its own folder: the family and scheduler in each manifest are what the exporter
read from the folder (the folders carry the real models' scheduler and model_index configs), never written
by the test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt.pipeline import Pipeline
from sdrt.specs import SizeRange
from sdrt_export.verify import load_reference, reference_images, use_scheduler, verify

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

BOUND = 1e-4
PROMPT = "a photo of a cat sitting on a red sofa"
EXPORTED = ("tiny-sd2", "tiny-lcm", "tiny-sdxl", "tiny-sdxl-inpaint")  # the TensorRT-RTX build covers these


def picture(width: int, height: int, seed: int = 0):
    """A deterministic RGB image with gradients and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, x * y], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    return Image.fromarray(rgb.astype(np.uint8))


def mask_picture(width: int, height: int):
    """White (repaint) over the right two thirds of the middle half, black elsewhere."""
    from PIL import Image

    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 3:] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def families(family_exports):
    """arch -> (model folder, ENGINE_DIR): the session's exports (tests/conftest.py)."""
    return family_exports


def compare(families, arch, scheduler, mode="txt2img", steps=3, guidance=7.5, seed=0, **case):
    model, engines = families(arch)
    ref = load_reference(model, mode, scheduler)
    use_scheduler(ref, scheduler)
    kwargs = dict(negative_prompt=case.pop("negative_prompt", ""), steps=steps, guidance=guidance, seed=seed,
                  width=case.pop("width", 64), height=case.pop("height", 64), batch=case.pop("batch", 1), **case)
    expected = reference_images(ref, mode, PROMPT, **kwargs)
    result = getattr(Pipeline(engines, threads=2), mode)(prompt=PROMPT, scheduler=scheduler, **kwargs)
    assert result.unit_images.shape == expected.shape
    error = float(np.abs(result.unit_images - expected).max())
    assert error <= BOUND, f"{arch} {mode} {scheduler} {steps} steps: max abs {error:.3e} > {BOUND}"
    assert float(expected.std()) > 1e-3
    return result


NON_SQUARE_B2 = dict(width=96, height=64, batch=2)
CASES = [
    # SD 2.1 768-v: its own DDIM v-prediction config, then two others (still v-prediction)
    ("tiny-sd2", None, dict(negative_prompt="blurry", seed=7)),
    ("tiny-sd2", None, dict(NON_SQUARE_B2, seed=8)),
    ("tiny-sd2", "Euler a", dict(NON_SQUARE_B2, negative_prompt="ugly")),
    ("tiny-sd2", "DPM++ 2M Karras", dict(width=64, height=96, steps=4)),
    # SD 2.1-base: PNDM, epsilon
    ("tiny-sd2-base", None, dict(NON_SQUARE_B2, negative_prompt="blurry", steps=4)),
    # SD-Turbo: Euler a with trailing spacing, 1-4 steps, no CFG
    ("tiny-sd-turbo", None, dict(steps=1, guidance=0.0)),
    ("tiny-sd-turbo", None, dict(NON_SQUARE_B2, steps=2, guidance=0.0)),
    ("tiny-sd-turbo", None, dict(steps=4, guidance=0.0, seed=3)),
    ("tiny-sd-turbo", "DPM++ 2M Karras", dict(steps=2, guidance=0.0)),
    # LCM: guidance as the UNet's timestep_cond, LCMScheduler; other schedulers vs StableDiffusionPipeline
    ("tiny-lcm", None, dict(steps=4, guidance=8.5)),
    ("tiny-lcm", None, dict(NON_SQUARE_B2, steps=2, guidance=1.5)),
    ("tiny-lcm", "Euler a", dict(steps=3, guidance=4.0)),
    ("tiny-lcm", "DPM++ 2M Karras", dict(width=64, height=96, steps=3)),
    # SDXL: both encoders, pooled embeds, time ids; an empty negative prompt gives zero embeddings
    ("tiny-sdxl", None, dict(negative_prompt="blurry", seed=7)),
    ("tiny-sdxl", None, dict(NON_SQUARE_B2, seed=8)),
    ("tiny-sdxl", "Euler a", dict(width=64, height=96)),
    ("tiny-sdxl", "DPM++ 2M Karras", dict(NON_SQUARE_B2, negative_prompt="ugly", steps=4)),
    ("tiny-sdxl", "DDIM", dict(guidance=1.0)),
    # SDXL-Turbo: Euler a, trailing, guidance 0 (batch 1 UNet calls), 1-4 steps
    ("tiny-sdxl-turbo", None, dict(steps=1, guidance=0.0)),
    ("tiny-sdxl-turbo", None, dict(NON_SQUARE_B2, steps=4, guidance=0.0, seed=5)),
]


@pytest.mark.parametrize("arch, scheduler, case", CASES,
                         ids=[f"{a}-{s or 'own'}-{i}" for i, (a, s, _) in enumerate(CASES)])
def test_txt2img_parity(families, arch, scheduler, case):
    compare(families, arch, scheduler, **case)


@pytest.mark.parametrize("arch", ["tiny-sd2", "tiny-sdxl"])
def test_img2img_parity(families, arch):
    compare(families, arch, "Euler a", mode="img2img", steps=4, strength=0.6, image=picture(96, 64, 1),
            negative_prompt="ugly", **NON_SQUARE_B2)


INPAINT_CASES = [
    # SDXL base (4-channel UNet): diffusers blends the kept region back at each step's noise level
    ("tiny-sdxl", None, 1.0, dict(NON_SQUARE_B2, negative_prompt="blurry", seed=3)),
    ("tiny-sdxl", None, 0.75, dict(width=64, height=96, seed=4)),
    ("tiny-sdxl", "DPM++ 2M Karras", 0.75, dict(NON_SQUARE_B2, negative_prompt="ugly", seed=5)),
    ("tiny-sdxl", "Euler a", 1.0, dict(width=64, height=64, seed=6)),
    # SDXL inpainting (9-channel UNet): mask and masked-image latents concatenated to the UNet input
    ("tiny-sdxl-inpaint", None, 1.0, dict(width=64, height=96, batch=2, seed=7)),
    ("tiny-sdxl-inpaint", None, 0.75, dict(NON_SQUARE_B2, negative_prompt="blurry", seed=8)),
    ("tiny-sdxl-inpaint", "UniPC", 0.75, dict(width=96, height=64, seed=9)),
    ("tiny-sdxl-inpaint", "DDIM", 1.0, dict(NON_SQUARE_B2, guidance=1.0, seed=10)),
]


@pytest.mark.parametrize("arch, scheduler, strength, case", INPAINT_CASES,
                         ids=[f"{a}-{s or 'own'}-{st}-{i}" for i, (a, s, st, _) in enumerate(INPAINT_CASES)])
def test_sdxl_inpaint_parity(families, arch, scheduler, strength, case):
    width, height = case["width"], case["height"]
    compare(families, arch, scheduler, mode="inpaint", steps=4, strength=strength,
            image=picture(width, height, case["seed"]), mask=mask_picture(width, height), **case)


@pytest.mark.parametrize("arch", ["tiny-sdxl", "tiny-sdxl-inpaint"])
def test_sdxl_inpaint_default_strength(families, arch):
    """No strength: StableDiffusionXLInpaintPipeline's default 0.9999 (one step fewer, image under noise)."""
    model, engines = families(arch)
    ref = load_reference(model, "inpaint")
    image, mask = picture(96, 64, 2), mask_picture(96, 64)
    with torch.no_grad():
        expected = ref(prompt=PROMPT, image=image, mask_image=mask, width=96, height=64, num_inference_steps=5,
                       output_type="np", generator=torch.Generator("cpu").manual_seed(1)).images
    result = Pipeline(engines, threads=2).inpaint(image, mask, PROMPT, steps=5, seed=1, width=96, height=64)
    assert result.parameters["strength"] == 0.9999
    assert float(np.abs(result.unit_images - expected).max()) <= BOUND


def test_sdxl_inpaint_cli(families, tmp_path, capsys):
    from sdrt.cli import main

    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    picture(96, 64).save(image)
    mask_picture(96, 64).save(mask)
    for arch in ("tiny-sdxl", "tiny-sdxl-inpaint"):
        out = tmp_path / f"{arch}.png"
        code = main(["inpaint", "--engines", str(families(arch)[1]), "--prompt", PROMPT, "--image", str(image),
                     "--mask", str(mask), "--steps", "3", "--seed", "0", "--batch", "2", "--out", str(out), "--json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 0, report
        assert report["parameters"]["strength"] == 0.9999
        assert (report["parameters"]["width"], report["parameters"]["height"]) == (96, 64)
        assert [p.name for p in sorted(tmp_path.glob(f"{arch}-*.png"))] == [f"{arch}-1.png", f"{arch}-2.png"]


def test_lcm_guidance_changes_image(families):
    sd = Pipeline(families("tiny-lcm")[1], threads=2)
    low, high = (sd.txt2img(PROMPT, steps=2, guidance=g, seed=1, width=64, height=64).unit_images for g in (1.5, 8))
    assert np.abs(low - high).max() > 1e-3


@pytest.mark.parametrize("arch, family, extra", [
    ("tiny-sd2", "sd2", {}),
    ("tiny-sd2-base", "sd2", {}),
    ("tiny-sd-turbo", "sd-turbo", {}),
    ("tiny-lcm", "lcm", {"time_cond_proj_dim": 256}),
    ("tiny-sdxl", "sdxl", {"text_2_hidden_size": 32, "text_embeds_dim": 32, "time_ids_dim": 6,
                           "cross_attention_dim": 64}),
    ("tiny-sdxl-inpaint", "sdxl", {"unet_in_channels": 9, "text_2_hidden_size": 32, "time_ids_dim": 6}),
    ("tiny-sdxl-turbo", "sdxl-turbo", {"text_2_hidden_size": 32, "time_ids_dim": 6}),
])
def test_family_in_manifest(families, arch, family, extra):
    """The exporter detected the family from the folder; the manifest's scheduler is the folder's own config."""
    from sdrt_export.wrappers import read_json

    model, engines = families(arch)
    sd = Pipeline(engines)
    assert sd.manifest.family == family and sd.dims.family == family
    assert sd.manifest.scheduler_config == read_json(model / "scheduler" / "scheduler_config.json")
    assert {k: getattr(sd.dims, k) for k in extra} == extra
    names = sd.manifest.specs["unet"].input_names
    assert ("timestep_cond" in names) == (family == "lcm")
    sdxl = family.startswith("sdxl")
    assert ("text_embeds" in names and "time_ids" in names) == sdxl
    assert sd.manifest.has("text_encoder_2") == sdxl
    assert sd.manifest.data["vae"]["force_upcast"] == sdxl
    pad = sd.conditioner.tokenizers[-1].pad_id
    assert pad == (0 if family != "lcm" else 49407)  # OpenCLIP tokenizers pad with "!" (id 0)


@pytest.mark.parametrize("arch, scheduler, family", [
    ("tiny-sd2", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, "sd2"),  # zero-SNR v-pred DDIM
    ("tiny-sd2-base", {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}, "sd-turbo"),
    ("tiny-sd-turbo", {"timestep_spacing": "leading"}, "sd2"),
    ("tiny-sd-turbo", {"_class_name": "DDIMScheduler"}, "sd2"),
    ("tiny-sd-turbo", {"prediction_type": "v_prediction"}, "sd2"),
    ("tiny-sdxl-turbo", {"_class_name": "EulerDiscreteScheduler"}, "sdxl-turbo"),
    ("tiny-sdxl-turbo", {"timestep_spacing": "linspace"}, "sdxl"),
    ("tiny-sdxl", {"timestep_spacing": "trailing", "_class_name": "EulerAncestralDiscreteScheduler"}, "sdxl-turbo"),
])
def test_family_follows_the_scheduler_config(families, tmp_path, arch, scheduler, family):
    """Turbo is told from the scheduler the folder ships (Euler/Euler a, trailing, epsilon), nothing else:
    the same folder with another scheduler config is detected as its base family, and the reverse."""
    from sdrt_export.wrappers import dims_from_model, read_json

    model = families(arch)[0]
    folder = tmp_path / arch
    for config in model.rglob("*.json"):
        (folder / config.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config, folder / config.relative_to(model))
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**read_json(path), **scheduler}))
    assert dims_from_model(folder).family == family


@pytest.mark.parametrize("arch, mode", [("tiny-sdxl", "txt2img"), ("tiny-sdxl-inpaint", "inpaint")])
def test_verify_sdxl(families, arch, mode):
    model, engines = families(arch)
    report = verify(model, engines, scheduler="Euler", steps=2, width=64, height=64)
    assert not report["failed"], report["message"]
    assert report["mode"] == mode
    assert set(report["stages_rel_l2"]) == {"text_embeddings", "text_embeddings_2", "unet_step", "vae_decode",
                                            "vae_encode"}


@pytest.mark.parametrize("arch, counts", [
    ("sd2", {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}),
    ("sdxl", {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
              "vae": 83_653_863}),
])
def test_full_size_param_counts_on_meta(arch, counts):
    from sdrt_export.archs import ARCHS

    config = ARCHS[arch]
    with torch.device("meta"):
        modules = {"unet": diffusers.UNet2DConditionModel(**config["unet"]),
                   "vae": diffusers.AutoencoderKL(**config["vae"]),
                   "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**config["text_encoder"]))}
        if "text_encoder_2" in config:
            modules["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**config["text_encoder_2"]))
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()} == counts
    assert all(p.is_meta for m in modules.values() for p in m.parameters())


@pytest.mark.parametrize("arch", EXPORTED)
def test_tensorrt_rtx_build_matches_the_family_specs(families, arch, tmp_path):
    """Each family builds with TensorRT-RTX ahead of time (no GPU): engines for every component its specs name,
    each recorded with the profile and I/O dtypes of its spec (SDXL: text_encoder_2, text_embeds, time_ids;
    LCM: timestep_cond; 9-channel inpaint UNet)."""
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt_rtx (pip install tensorrt-rtx; part of the test extra)")
    from sdrt.manifest import load_manifest
    from sdrt_export.build_engines import build_engines

    model, engines = families(arch)
    out = shutil.copytree(engines, tmp_path / "e")
    summary = build_engines(model, out, "tensorrt-rtx", sizes=SizeRange(64, 64, 128, 2), progress=False)
    manifest = load_manifest(out)
    assert sorted(summary["built"]) == sorted(manifest.specs.components)
    records = manifest.engines("tensorrt-rtx")["components"]
    for spec in manifest.specs:
        record = records[spec.name]
        assert {n: t["dtype"] for n, t in record["io"].items()} == {t.name: t.dtype for t in spec.tensors}
        assert record["profile"] == {k: [list(s) for s in v] for k, v in spec.profile(manifest.sizes).items()}
        manifest.verified_engine("tensorrt-rtx", spec.name)


def test_sdxl_fp16_export_keeps_the_vae_in_fp32(tiny_sdxl_fp16_engine_dir):
    """force_upcast (the SDXL VAE overflows fp16): an fp16 export writes the VAE in fp32, the rest in fp16.
    Its numbers against torch and diffusers fp32: ``test_fp16_torch.py``."""
    import onnx

    from sdrt.manifest import load_manifest

    manifest = load_manifest(tiny_sdxl_fp16_engine_dir)
    assert manifest.data["vae"]["force_upcast"] is True
    for spec in manifest.specs:
        want = "fp32" if spec.name.startswith("vae_") else "fp16"
        assert manifest.component(spec.name)["precision"] == want, spec.name
        graph = onnx.load(str(manifest.verified_path(spec.name)), load_external_data=False).graph
        has_fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
        assert has_fp16 == (want == "fp16"), spec.name
