"""LoRA parity: sdrt (run-time and export-time merge) vs diffusers' load_lora_weights + fuse_lora, on random non-zero
LoRAs (kohya and peft files, UNet-only and UNet + text encoders, Linear, 1×1 and 3×3 conv targets)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdrt.cli import main
from sdrt.pipeline import Pipeline
from sdrt.specs import SizeRange

pytest.importorskip("peft")  # diffusers' LoRA loader needs the peft backend

REQUEST = dict(prompt="a photo of a cat", negative_prompt="", steps=2, guidance=7.5, seed=3, width=64, height=64)
IMAGE_TOL, MERGE_TOL, CHANGED = 1e-4, 1e-5, 1e-2


def _reference(model_dir, pairs, **request):
    from sdrt_export.lora import fuse_reference
    from sdrt_export.verify import load_reference, reference_images

    pipe = load_reference(model_dir)
    fuse_reference(pipe, pairs)
    return reference_images(pipe, "txt2img", **{**REQUEST, **request})


@pytest.fixture(scope="module")
def sd15_loras(tiny_model_dir, tmp_path_factory):
    from sdrt_export.lora_random import write_random_lora

    root = tmp_path_factory.mktemp("loras")
    return {
        "kohya_te": str(write_random_lora(tiny_model_dir, root / "kohya_te.safetensors", "kohya",
                                          ("unet", "text_encoder"), rank=4, alpha=2.0, seed=1)),
        "peft_unet": str(write_random_lora(tiny_model_dir, root / "peft_unet.safetensors", "peft", ("unet",),
                                           rank=4, seed=2)),
        "kohya_unet": str(write_random_lora(tiny_model_dir, root / "kohya_unet.safetensors", "kohya", ("unet",),
                                            rank=2, seed=3)),
    }


def test_weight_map_is_one_to_one_and_matches_torch(tiny_model_dir, tiny_engine_dir):
    """Every Linear/Conv2d weight maps to one initializer holding exactly its values (transposed where recorded)."""
    from sdrt_export.weight_map import inner_model, lora_targets
    from sdrt_export.wrappers import load_component

    from sdrt.lora import load_weight_map
    from sdrt.manifest import load_manifest
    from sdrt.onnx_weights import Location

    manifest = load_manifest(tiny_engine_dir)
    for component in ("unet", "text_encoder"):
        mapping = load_weight_map(manifest, component)
        weights = lora_targets(inner_model(load_component(tiny_model_dir, component)))
        assert set(mapping) == set(weights)
        assert len({e["initializer"] for e in mapping.values()}) == len(mapping)
        for name, entry in mapping.items():
            size = int(np.prod(entry["shape"])) * 4
            onnx = Location(entry["file"], entry["offset"], size, entry["dtype"], tuple(entry["shape"])).read(
                tiny_engine_dir)
            torch_value = weights[name].numpy()
            np.testing.assert_array_equal(onnx, torch_value.T if entry["transpose"] else torch_value)
        assert any(e["transpose"] for e in mapping.values()), "the exporter pre-transposes MatMul weights"
        if component == "unet":
            assert any(len(e["shape"]) == 4 and e["shape"][2:] == [3, 3] for e in mapping.values())


@pytest.mark.parametrize("case", [["kohya_te"], ["peft_unet"], ["kohya_te", "peft_unet"]],
                         ids=["kohya-unet+te", "peft-unet", "two-loras"])
def test_runtime_lora_matches_diffusers_sd15(tiny_model_dir, tiny_engine_dir, sd15_loras, case):
    pairs = [(sd15_loras[name], w) for name, w in zip(case, (0.8, 0.6))]
    pipe = Pipeline(tiny_engine_dir)
    base = pipe.txt2img(**REQUEST).unit_images
    result = pipe.txt2img(loras=pairs, **REQUEST)
    expected = _reference(tiny_model_dir, pairs)
    assert np.abs(result.unit_images - expected).max() <= IMAGE_TOL
    assert np.abs(result.unit_images - base).max() > CHANGED  # the LoRA does change the image
    assert [(e["path"], e["weight"]) for e in result.parameters["loras"]] == pairs


def test_switching_a_b_a_is_exact(tiny_engine_dir, sd15_loras):
    """Always base + deltas: A, then B, then A again gives A's weights and image bit for bit; none gives base."""
    pipe = Pipeline(tiny_engine_dir)
    base = pipe.txt2img(**REQUEST).unit_images
    a = [(sd15_loras["kohya_te"], 0.8)]
    first = pipe.txt2img(loras=a, **REQUEST).unit_images
    weights_a = {k: v[0].copy() for k, v in pipe.loras.merged("unet").items()}
    b = pipe.txt2img(loras=[(sd15_loras["kohya_unet"], 1.0)], **REQUEST).unit_images
    assert np.abs(b - first).max() > CHANGED
    again = pipe.txt2img(loras=a, **REQUEST).unit_images
    np.testing.assert_array_equal(again, first)
    for name, value in pipe.loras.merged("unet").items():
        np.testing.assert_array_equal(value[0], weights_a[name])
    np.testing.assert_array_equal(pipe.txt2img(**REQUEST).unit_images, base)
    assert len(pipe.loras._engines) == 0  # no LoRA: the previous set's sessions are closed (memory policy)


@pytest.fixture(scope="module")
def merged_export(tiny_model_dir, sd15_loras, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "tiny-lora"
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--min-size", "64", "--max-size", "128",
                 "--opt-size", "64", "--max-batch", "1", "--json", "--lora", f"{sd15_loras['kohya_te']}:0.8",
                 "--lora", f"{sd15_loras['peft_unet']}:0.6"]) == 0
    return out


@pytest.mark.slow
def test_export_merge_matches_runtime_and_diffusers(tiny_model_dir, tiny_engine_dir, sd15_loras, merged_export):
    from sdrt.manifest import sha256_file

    pairs = [(sd15_loras["kohya_te"], 0.8), (sd15_loras["peft_unet"], 0.6)]
    records = json.loads((merged_export / "manifest.json").read_text())["loras"]
    assert [(r["sha256"], r["weight"]) for r in records] == [(sha256_file(p), w) for p, w in pairs]
    merged = Pipeline(merged_export).txt2img(**REQUEST).unit_images
    runtime = Pipeline(tiny_engine_dir).txt2img(loras=pairs, **REQUEST).unit_images
    assert np.abs(merged - runtime).max() <= MERGE_TOL
    assert np.abs(merged - _reference(tiny_model_dir, pairs)).max() <= IMAGE_TOL
    base = Pipeline(tiny_engine_dir).txt2img(**REQUEST).unit_images
    assert np.abs(merged - base).max() > CHANGED


@pytest.fixture(scope="module")
def sdxl(family_exports, tmp_path_factory):
    from sdrt_export.lora_random import write_random_lora

    model, engines = family_exports("tiny-sdxl")
    root = tmp_path_factory.mktemp("sdxl-loras")
    files = {"kohya_all": str(write_random_lora(model, root / "kohya_all.safetensors", "kohya",
                                                ("unet", "text_encoder", "text_encoder_2"), rank=4, alpha=8.0, seed=4)),
             "peft_unet": str(write_random_lora(model, root / "peft_unet.safetensors", "peft", ("unet",), rank=4,
                                                alpha=2.0, seed=5))}
    return model, engines, files


@pytest.mark.slow
@pytest.mark.parametrize("case", [["kohya_all"], ["peft_unet"], ["kohya_all", "peft_unet"]],
                         ids=["kohya-unet+te1+te2", "peft-unet", "two-loras"])
def test_runtime_lora_matches_diffusers_sdxl(sdxl, case):
    model, engines, files = sdxl
    pairs = [(files[name], w) for name, w in zip(case, (0.7, 1.2))]
    pipe = Pipeline(engines)
    base = pipe.txt2img(**REQUEST).unit_images
    got = pipe.txt2img(loras=pairs, **REQUEST).unit_images
    assert np.abs(got - _reference(model, pairs)).max() <= IMAGE_TOL
    assert np.abs(got - base).max() > CHANGED


@pytest.mark.slow
def test_sdxl_export_merge_matches_runtime_and_diffusers(sdxl, tmp_path):
    from sdrt_export.exporter import export_model

    model, engines, files = sdxl
    pairs = [(files["kohya_all"], 0.7)]
    out = export_model(model, tmp_path / "sdxl-lora", sizes=SizeRange(64, 64, 64, 1), progress=False,
                       loras=pairs)["engine_dir"]
    merged = Pipeline(out).txt2img(**REQUEST).unit_images
    assert np.abs(merged - Pipeline(engines).txt2img(loras=pairs, **REQUEST).unit_images).max() <= MERGE_TOL
    assert np.abs(merged - _reference(model, pairs)).max() <= IMAGE_TOL


def test_fp16_artifact_runtime_lora(tiny_fp16_engine_dir, tiny_engine_dir, sd15_loras):
    """fp16 exports: the map finds the fp16 (and fp32-island) initializers; the merge is done in fp32 and cast."""
    from sdrt.lora import load_weight_map
    from sdrt.manifest import load_manifest

    mapping = load_weight_map(load_manifest(tiny_fp16_engine_dir), "unet")
    assert {e["dtype"] for e in mapping.values()} >= {"float16"}
    assert mapping.keys() == load_weight_map(load_manifest(tiny_engine_dir), "unet").keys()
    pairs = [(sd15_loras["kohya_te"], 0.8)]
    pipe = Pipeline(tiny_fp16_engine_dir)
    base = pipe.txt2img(**REQUEST).unit_images
    got = pipe.txt2img(loras=pairs, **REQUEST).unit_images
    fp32 = Pipeline(tiny_engine_dir).txt2img(loras=pairs, **REQUEST).unit_images
    assert np.abs(got - base).max() > CHANGED
    assert np.abs(got - fp32).max() <= 2e-2


def test_sgm_key_mapping_matches_diffusers():
    """kohya's SDXL (sgm UNet) module names map as diffusers' own converters map them."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    from sdrt.lora import _sgm_to_diffusers

    class Config:
        layers_per_block = 2

    keys = ["input_blocks_1_0_in_layers_2", "input_blocks_4_1_transformer_blocks_0_ff_net_2", "input_blocks_3_0_op",
            "input_blocks_5_0_skip_connection", "input_blocks_8_1_proj_in", "middle_block_1_proj_out",
            "middle_block_2_emb_layers_1", "output_blocks_2_2_conv", "output_blocks_5_1_transformer_blocks_1_ff_net_2",
            "output_blocks_0_0_out_layers_3", "label_emb_0_0", "input_blocks_0_0"]
    for key in keys:
        (mapped,) = _maybe_map_sgm_blocks_to_diffusers({f"lora_unet_{key}.lora_down.weight": 0}, Config())
        want = _convert_unet_lora_key(mapped).removesuffix(".lora.down.weight").replace(".processor", "")
        assert _sgm_to_diffusers(key, 2) == want.replace(".", "_"), key


def test_verify_cli_with_lora(tiny_model_dir, tiny_engine_dir, sd15_loras, capsys):
    code = main(["verify", "--model", str(tiny_model_dir), "--engines", str(tiny_engine_dir), "--steps", "2",
                 "--width", "64", "--height", "64", "--lora", f"{sd15_loras['kohya_te']}:0.8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and not report["failed"] and report["image_max_abs"] <= IMAGE_TOL
    assert report["loras"] == [{"path": sd15_loras["kohya_te"], "weight": 0.8}]


@pytest.mark.slow
def test_runtime_lora_on_ort_optimized_artifact(tiny_model_dir, tiny_engine_dir, sd15_loras, tmp_path):
    """build-engines --backend ort-cpu graphs fuse weights; run-time LoRA opens the exported ONNX there, so the
    image equals the plain artifact's (to the optimized VAE graph's rounding: the VAE has no LoRA)."""
    import shutil

    copy = tmp_path / "optimized"
    shutil.copytree(tiny_engine_dir, copy)
    assert main(["build-engines", "--model", str(tiny_model_dir), "--out", str(copy), "--backend", "ort-cpu",
                 "--json"]) == 0
    assert json.loads((copy / "manifest.json").read_text()).get("engines", {}).get("ort-cpu")
    pairs = [(sd15_loras["kohya_te"], 0.8)]
    pipe = Pipeline(copy)
    base, got = pipe.txt2img(**REQUEST).unit_images, pipe.txt2img(loras=pairs, **REQUEST).unit_images
    assert np.abs(got - Pipeline(tiny_engine_dir).txt2img(loras=pairs, **REQUEST).unit_images).max() <= MERGE_TOL
    assert np.abs(got - base).max() > CHANGED


@pytest.mark.slow
def test_runtime_lora_on_external_data_artifact(tiny_model_dir, sd15_loras, tmp_path, monkeypatch):
    """Weights in NAME.onnx.data (the layout of models over 2 GB): the map points into the data file and ONNX
    Runtime takes the merged weights as external initializers."""
    from sdrt_export import graph
    from sdrt_export.exporter import export_model

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
    out = export_model(tiny_model_dir, tmp_path / "external", sizes=SizeRange(64, 64, 64, 1),
                       progress=False)["engine_dir"]
    from sdrt.lora import load_weight_map
    from sdrt.manifest import load_manifest

    assert {e["file"] for e in load_weight_map(load_manifest(out), "unet").values()} == {"unet.onnx.data"}
    pairs = [(sd15_loras["kohya_te"], 0.8), (sd15_loras["peft_unet"], 0.6)]
    got = Pipeline(out).txt2img(loras=pairs, **REQUEST).unit_images
    assert np.abs(got - _reference(tiny_model_dir, pairs)).max() <= IMAGE_TOL
