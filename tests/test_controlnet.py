"""ControlNet (SD1.x layout, tiny): export, run time, parity with diffusers' ControlNet pipelines, errors.

The ControlNets are ``ControlNetModel.from_unet(tiny UNet)`` with their zero convolutions re-initialized
(``write_random_controlnet``): a fresh one outputs exactly zero residuals and would prove nothing. One artifact
holds two nets; single-net parity runs it with the second net at scale 0 (skipped: adds exactly zero) against
diffusers' single-ControlNet pipeline, two-net parity against its MultiControlNetModel.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from sdrt.cli import main
from sdrt.controlnet import ControlNetError
from sdrt.errors import ImageInputError, ModelError
from sdrt.manifest import load_manifest
from sdrt.pipeline import Pipeline
from sdrt.specs import SizeRange, build_specs, control_residuals
from sdrt_export import controlnet as cn
from sdrt_export.archs import ARCHS
from sdrt_export.exporter import export_model

BOUND = 1e-4
PROMPT = "a photo of a cat"


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture: gradients, a disc, noise (a stand-in for an edge or depth map)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.3 - 0.3 * (seed % 2)) ** 2 + (y - 0.5) ** 2 < 0.06).astype(float)
    rgb = np.stack([x * (seed % 3), y, disc], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def nets(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return [cn.write_random_controlnet(tiny_model_dir, root / f"net{k}", seed=k + 1) for k in range(2)]


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, nets, tmp_path_factory):
    """The tiny model exported with both ControlNets (sizes 64..128, max batch 2)."""
    out = tmp_path_factory.mktemp("cn-engines") / "tiny-cn"
    export_model(tiny_model_dir, out, sizes=SizeRange(64, 64, 128, 2), progress=False, controlnet_dirs=nets)
    return out


@pytest.fixture(scope="module")
def sd(artifact):
    return Pipeline(artifact, threads=2)


@pytest.fixture(scope="module")
def references(tiny_model_dir, nets):
    cache = {}

    def get(mode, count):
        if (mode, count) not in cache:
            cache[mode, count] = cn.load_reference(tiny_model_dir, nets[:count], mode)
        return cache[mode, count]

    return get


def test_random_controlnet_outputs_nonzero_residuals_where_a_fresh_one_outputs_zero(tiny_model_dir, nets):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    args = (torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32))
    kwargs = dict(controlnet_cond=torch.rand(1, 3, 64, 64), return_dict=False)
    with torch.no_grad():
        fresh = ControlNetModel.from_unet(unet)(*args, **kwargs)
        ours = ControlNetModel.from_pretrained(nets[0])(*args, **kwargs)
    assert all(float(r.abs().max()) == 0.0 for r in (*fresh[0], fresh[1]))
    assert all(float(r.abs().max()) > 0.0 for r in (*ours[0], ours[1]))


@pytest.mark.parametrize("arch, down", [("sd15", 12), ("sd2", 12), ("sdxl", 9), ("tiny", 6)])
def test_residual_layout_matches_diffusers_controlnet(arch, down):
    """12 + 1 residuals for SD1.x/2.x, 9 + 1 for SDXL, from the UNet config; diffusers' own ControlNetModel
    (on the meta device: no weights) builds the same blocks."""
    from diffusers import ControlNetModel

    config = ARCHS[arch]["unet"]
    layout = cn.residual_layout(config)
    with torch.device("meta"):
        net = ControlNetModel.from_config({k: v for k, v in config.items() if k not in ("out_channels",
                                                                                       "up_block_types")})
    assert len(layout) == down + 1 == len(net.controlnet_down_blocks) + 1
    assert [c for c, _ in layout] == [b.out_channels for b in net.controlnet_down_blocks] + \
        [net.controlnet_mid_block.out_channels]


def test_export_records_the_nets_and_graphs_match_the_specs(artifact, nets):
    manifest = load_manifest(artifact)
    names = ["controlnet_0", "controlnet_1", "unet_control"]
    assert all(manifest.has(n) for n in ["unet", *names])  # the plain UNet stays
    assert [r["path"] for r in manifest.data["controlnets"]] == [str(n.absolute()) for n in nets]
    specs = manifest.specs
    residuals = [t.name for t in control_residuals(manifest.dims)]
    assert len(residuals) == 7 and specs["controlnet_0"].output_names == residuals
    assert specs["unet_control"].input_names == specs["unet"].input_names + residuals
    assert specs["controlnet_0"].input_names == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                                 "conditioning_scale"]
    for name in names:
        graph = onnx.load(str(manifest.verified_path(name)), load_external_data=False).graph
        assert [i.name for i in graph.input] == specs[name].input_names
        assert [o.name for o in graph.output] == specs[name].output_names
    # shapes as functions of (batch, height, width): ceil-halved latent sides at each level
    shapes = specs["controlnet_0"].shapes(2, 72, 64)
    assert shapes["down_block_res_sample_0"] == (2, 32, 9, 8) and shapes["mid_block_res_sample"] == (2, 64, 5, 4)
    assert build_specs(manifest.dims)["controlnet_1"].shapes(1, 64, 64)["controlnet_cond"] == (1, 3, 64, 64)


def compare(sd, references, mode, count, *, steps=3, guidance=7.5, width=64, height=64, seed=3, batch=1,
            **control):
    images = [picture(width, height, 10 + k) for k in range(2)]
    scales = control.pop("control_scales", 1.0)
    sdrt_scales = (list(scales) + [0.0] * (2 - count)) if isinstance(scales, list) else [scales] * count + \
        [0.0] * (2 - count)
    request = dict(steps=steps, guidance=guidance, seed=seed, width=width, height=height, batch=batch)
    extra = {}
    if mode != "txt2img":
        extra = {"image": picture(width, height, 5), "strength": 0.7 if mode == "img2img" else 1.0}
    if mode == "inpaint":
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4:, : width // 2] = 255
        extra["mask"] = Image.fromarray(mask)
    got = getattr(sd, mode)(prompt=PROMPT, control_images=images, control_scales=sdrt_scales, **control,
                            **request, **extra)
    want = cn.reference_images(references(mode, count), mode, PROMPT, control_images=images[:count],
                               control_scales=scales, **control, **request, **extra)
    error = float(np.abs(got.unit_images - want).max())
    assert error <= BOUND, error
    return got


@pytest.mark.parametrize("control", [
    dict(),
    dict(control_scales=0.6, control_start=0.3, control_end=0.8),
    dict(guess_mode=True, control_scales=0.8),
], ids=["default", "scale-start-end", "guess-mode"])
def test_txt2img_parity_one_controlnet(sd, references, control):
    compare(sd, references, "txt2img", 1, **control)


@pytest.mark.parametrize("control", [
    dict(control_scales=[0.7, 1.3]),
    dict(control_scales=[1.0, 0.5], guess_mode=True, control_end=0.6),
], ids=["scales", "guess-mode-end"])
def test_txt2img_parity_two_controlnets(sd, references, control):
    compare(sd, references, "txt2img", 2, **control)


def test_parity_without_cfg_and_non_square(sd, references):
    compare(sd, references, "txt2img", 2, guidance=1.0, width=96, height=64, control_scales=[0.9, 0.4],
            guess_mode=True)


def test_parity_batch_of_two(sd, references):
    """The control image is repeated over the batch (and doubled for CFG)."""
    compare(sd, references, "txt2img", 2, batch=2, control_scales=[0.5, 1.0], control_start=0.34)


def test_img2img_parity(sd, references):
    compare(sd, references, "img2img", 1, steps=4, control_scales=0.9, control_start=0.2)


def test_inpaint_parity(sd, references):
    compare(sd, references, "inpaint", 2, control_scales=[0.8, 0.6])


def test_control_image_changes_the_result_and_parameters_record_it(sd):
    request = dict(prompt=PROMPT, steps=3, seed=5, width=64, height=64)
    plain = sd.txt2img(**request)
    a = sd.txt2img(**request, control_images=[picture(64, 64, 1), picture(64, 64, 2)])
    b = sd.txt2img(**request, control_images=[picture(64, 64, 3), picture(64, 64, 2)])
    assert float(np.abs(a.unit_images - plain.unit_images).max()) > 1e-2
    assert float(np.abs(a.unit_images - b.unit_images).max()) > 1e-2
    assert a.parameters["control_images"] == ["<image 64x64>"] * 2
    assert (a.parameters["control_scales"], a.parameters["control_start"], a.parameters["control_end"],
            a.parameters["guess_mode"]) == ([1.0, 1.0], 0.0, 1.0, False)
    assert "control_images" not in plain.parameters
    # the image is resized to the output size (diffusers' control image processor)
    c = sd.txt2img(**request, control_images=[picture(64, 64, 1).resize((80, 48)), picture(64, 64, 2)])
    assert c.images.shape == (1, 64, 64, 3)


def test_cli_txt2img_with_control_images_equals_the_api(sd, artifact, tmp_path, capsys):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"c{k}.png")
        picture(64, 64, 20 + k).save(paths[-1])
    out = tmp_path / "out.png"
    code = main(["txt2img", "--engines", str(artifact), "--prompt", PROMPT, "--steps", "2", "--seed", "4",
                 "--width", "64", "--height", "64", "--out", str(out), "--control-image", str(paths[0]),
                 "--control-image", str(paths[1]), "--control-scale", "0.5", "--control-scale", "1.5",
                 "--control-end", "0.5", "--guess-mode", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"]["control_images"] == [str(p) for p in paths]
    api = sd.txt2img(prompt=PROMPT, steps=2, seed=4, width=64, height=64, control_images=paths,
                     control_scales=[0.5, 1.5], control_end=0.5, guess_mode=True)
    assert np.array_equal(np.asarray(Image.open(out)), api.images[0])


@pytest.mark.parametrize("flags, message", [
    (["--control-image", "{img}"], "1 control image(s) given for the 2 ControlNet(s)"),
    (["--control-image", "{bad}", "--control-image", "{img}"], "control image 1"),
    (["--control-image", "{img}", "--control-image", "{img}", "--control-start", "0.5", "--control-end", "0.5"],
     "0 <= start < end <= 1"),
    (["--control-image", "{img}", "--control-image", "{img}", "--control-scale", "nan"], "finite number"),
    (["--control-image", "{img}", "--control-image", "{img}", "--control-scale", "1", "--control-scale", "2",
      "--control-scale", "3"], "3 control scales given for 2"),
    (["--control-scale", "0.5"], "given without a control image"),
])
def test_cli_errors_are_one_line_exit_2(artifact, tmp_path, capsys, flags, message):
    img, bad = tmp_path / "c.png", tmp_path / "bad.png"
    picture(64, 64, 1).save(img)
    bad.write_bytes(b"not an image")
    argv = ["txt2img", "--engines", str(artifact), "--prompt", "x", "--steps", "1", "--width", "64", "--height",
            "64", "--out", str(tmp_path / "o.png")] + [f.format(img=img, bad=bad) for f in flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.png").exists()


def test_api_errors_are_typed(sd, tiny_engine_dir):
    image = picture(64, 64, 1)
    with pytest.raises(ControlNetError, match="has no ControlNet"):
        Pipeline(tiny_engine_dir).txt2img(PROMPT, steps=1, width=64, height=64, control_images=[image])
    with pytest.raises(ImageInputError, match="control image 2"):
        sd.txt2img(PROMPT, steps=1, width=64, height=64, control_images=[image, "/nonexistent.png"])
    with pytest.raises(ControlNetError, match="finite"):
        sd.txt2img(PROMPT, steps=1, width=64, height=64, control_images=[image, image],
                   control_scales=[1.0, float("inf")])
    with pytest.raises(ControlNetError, match="start"):
        sd.txt2img(PROMPT, steps=1, width=64, height=64, control_images=[image, image], control_start=0.9,
                   control_end=0.2)


def test_export_refuses_a_controlnet_of_another_family(tiny_model_dir, tiny_sdxl_model_dir, tmp_path, capsys):
    foreign = cn.write_random_controlnet(tiny_sdxl_model_dir, tmp_path / "sdxl-net")
    with pytest.raises(ModelError, match="does not fit this sd15 model"):
        export_model(tiny_model_dir, tmp_path / "out", progress=False, controlnet_dirs=[foreign])
    code = main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out2"), "--controlnet",
                 str(foreign)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cross_attention_dim" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a ControlNetModel|is missing"):
        export_model(tiny_model_dir, tmp_path / "out3", progress=False, controlnet_dirs=[tmp_path / "empty"])
