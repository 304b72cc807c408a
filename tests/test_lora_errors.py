"""LoRA selection and errors: prompt tags, CLI flags, PNG parameters, and every refused LoRA (one line, exit 2)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.lora import LoraError, LoraFileError, LoraMismatchError
from sdrt.pipeline import Pipeline

REQUEST = dict(negative_prompt="", steps=2, guidance=7.5, seed=1, width=64, height=64)
CLI = ["--steps", "1", "--width", "64", "--height", "64", "--seed", "1"]


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def lora_file(tiny_model_dir, tmp_path_factory):
    from sdrt_export.lora_random import write_random_lora

    return str(write_random_lora(tiny_model_dir, tmp_path_factory.mktemp("lora-dir") / "kohya_te.safetensors",
                                 "kohya", ("unet", "text_encoder"), rank=4, alpha=2.0, seed=1))


def _one_line_error(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def test_prompt_tags_are_resolved_and_removed(tiny_engine_dir, lora_file):
    from pathlib import Path

    pipe = Pipeline(tiny_engine_dir)
    tagged = pipe.txt2img(prompt="a cat <lora:kohya_te:0.8>", lora_dir=str(Path(lora_file).parent), **REQUEST)
    explicit = pipe.txt2img(prompt="a cat ", loras=[(lora_file, 0.8)], **REQUEST)
    plain = pipe.txt2img(prompt="a cat ", **REQUEST)
    np.testing.assert_array_equal(tagged.unit_images, explicit.unit_images)
    assert np.abs(tagged.unit_images - plain.unit_images).max() > 1e-3
    assert tagged.parameters["prompt"] == "a cat <lora:kohya_te:0.8>"
    assert tagged.parameters["loras"][0]["weight"] == 0.8
    with pytest.raises(LoraError, match="needs a LoRA folder"):
        pipe.txt2img(prompt="a cat <lora:kohya_te:0.8>", **REQUEST)
    with pytest.raises(LoraError, match="not a number"):
        pipe.txt2img(prompt="a cat <lora:kohya_te:lots>", lora_dir=str(Path(lora_file).parent), **REQUEST)
    with pytest.raises(LoraFileError, match="no other.safetensors"):
        pipe.txt2img(prompt="<lora:other>", lora_dir=str(Path(lora_file).parent), **REQUEST)


def test_cli_lora_png_parameters(tiny_engine_dir, lora_file, tmp_path):
    """--lora FILE:W: the PNG's parameters carry the tag (A1111 reproduces it) and A1111's Lora hashes field."""
    out = tmp_path / "cat.png"
    assert main(["txt2img", "--engines", str(tiny_engine_dir), "--prompt", "a cat", "--out", str(out),
                 "--lora", f"{lora_file}:0.7", *CLI]) == 0
    text = Image.open(out).text["parameters"]
    data = open(lora_file, "rb").read()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert text.splitlines()[0] == "a cat <lora:kohya_te:0.7>"
    assert f'Lora hashes: "kohya_te: {addnet}"' in text


def test_cli_missing_file_and_bad_weight(tiny_engine_dir, lora_file, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["txt2img", "--engines", str(tiny_engine_dir), "--prompt", "a cat", "--out", str(out), *CLI]
    _one_line_error(capsys, main(base + ["--lora", str(tmp_path / "missing.safetensors")]), "does not exist")
    _one_line_error(capsys, main(base + ["--lora", f"{lora_file}:abc"]), "not a number")
    _one_line_error(capsys, main(base + ["--lora", f"{lora_file}:nan"]), "not a finite number")
    assert not out.exists()


def test_export_refuses_bad_lora_before_exporting(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "engines"
    code = main(["export", "--model", str(tiny_model_dir), "--out", str(out),
                 "--lora", str(tmp_path / "nope.safetensors")])
    _one_line_error(capsys, code, "does not exist")
    assert not out.exists()


def test_lora_that_matches_nothing_names_keys(tiny_engine_dir, tmp_path, capsys):
    path = _save(tmp_path / "alien.safetensors", {
        "lora_unet_nowhere_block_0_to_q.lora_down.weight": np.ones((2, 8)),
        "lora_unet_nowhere_block_0_to_q.lora_up.weight": np.ones((8, 2))})
    with pytest.raises(LoraMismatchError, match="no key matches .* unet.nowhere_block_0_to_q"):
        Pipeline(tiny_engine_dir).txt2img(prompt="a cat", loras=[(path, 1.0)], **REQUEST)
    code = main(["txt2img", "--engines", str(tiny_engine_dir), "--prompt", "a", "--out", str(tmp_path / "a.png"),
                 "--lora", path, *CLI])
    _one_line_error(capsys, code, "nowhere_block_0_to_q")


def _mapping(engine_dir):
    from sdrt.lora import load_weight_map
    from sdrt.manifest import load_manifest

    return load_weight_map(load_manifest(engine_dir), "unet")


def test_rank_and_shape_mismatch(tiny_engine_dir, tmp_path):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    entry = _mapping(tiny_engine_dir)[name + ".weight"]
    out_dim, in_dim = entry["shape"][::-1]
    key = "lora_unet_" + name.replace(".", "_")
    rank = _save(tmp_path / "rank.safetensors", {f"{key}.lora_down.weight": np.ones((4, in_dim)),
                                                 f"{key}.lora_up.weight": np.ones((out_dim, 3))})
    shape = _save(tmp_path / "shape.safetensors", {f"{key}.lora_down.weight": np.ones((4, in_dim + 8)),
                                                   f"{key}.lora_up.weight": np.ones((out_dim, 4))})
    pipe = Pipeline(tiny_engine_dir)
    with pytest.raises(LoraMismatchError, match="rank mismatch"):
        pipe.txt2img(prompt="a", loras=[(rank, 1.0)], **REQUEST)
    with pytest.raises(LoraMismatchError, match="shape mismatch"):
        pipe.txt2img(prompt="a", loras=[(shape, 1.0)], **REQUEST)


def test_sdxl_lora_on_sd15_artifact(tiny_engine_dir, tmp_path, capsys):
    te2 = _save(tmp_path / "te2.safetensors", {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((4, 32)),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((32, 4))})
    sgm = _save(tmp_path / "sgm.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": np.ones((4, 640)),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": np.ones((640, 4))})
    for path in (te2, sgm):
        code = main(["txt2img", "--engines", str(tiny_engine_dir), "--prompt", "a", "--out", str(tmp_path / "a.png"),
                     "--lora", path, *CLI])
        _one_line_error(capsys, code, "SDXL LoRA", "sd15")


def test_not_a_lora_file(tiny_engine_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    other = _save(tmp_path / "other.safetensors", {"model.weight": np.ones((2, 2))})
    dora = _save(tmp_path / "dora.safetensors", {"lora_unet_a.lora_down.weight": np.ones((1, 2)),
                                                 "lora_unet_a.lora_up.weight": np.ones((2, 1)),
                                                 "lora_unet_a.dora_scale": np.ones((2, 1))})
    pipe = Pipeline(tiny_engine_dir)
    for path, message in ((junk, "cannot read LoRA"), (other, "is not a LoRA"), (dora, "DoRA")):
        with pytest.raises(LoraFileError, match=message):
            pipe.txt2img(prompt="a", loras=[(str(path), 1.0)], **REQUEST)


def test_artifact_without_weight_map_says_reexport(tiny_engine_dir, lora_file, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_engine_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["components"].values():
        entry.pop("weight_map", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoraError, match="no weight map for unet.*re-export"):
        Pipeline(old).txt2img(prompt="a", loras=[(lora_file, 1.0)], **REQUEST)


def test_tensorrt_refits_in_place_from_base(tiny_engine_dir, lora_file, tmp_path, monkeypatch):
    """TensorRT: the base engine is refitted to the set in use (full merged arrays), and back to base ({}) when a
    set stops touching it; nothing is refitted while the set stays the same."""
    from sdrt_export.lora_random import write_random_lora

    import sdrt.backends.refit as refit_module
    import sdrt.pipelines.base as base_module

    calls = []
    monkeypatch.setattr(base_module, "open_engine", lambda manifest, name, *a, **k: f"engine-{name}")
    monkeypatch.setattr(refit_module, "refit", lambda engine, changed: calls.append(
        (engine, {k: float(v.sum()) for k, v in changed.items()})))
    unet_only = str(write_random_lora(_model_of(tiny_engine_dir), tmp_path / "u.safetensors", "peft", ("unet",),
                                      seed=9))
    pipe = Pipeline(tiny_engine_dir, backend="tensorrt")
    assert pipe.engine("text_encoder") == "engine-text_encoder" and calls == []  # no LoRA: no refit
    pipe.loras.activate([(lora_file, 0.8)])
    pipe.engine("text_encoder"), pipe.engine("unet"), pipe.engine("unet")
    first = list(calls)
    assert [c[0] for c in first] == ["engine-text_encoder", "engine-unet"] and all(c[1] for c in first)
    pipe.loras.activate([(unet_only, 1.0)])
    pipe.engine("text_encoder"), pipe.engine("unet")
    assert calls[2] == ("engine-text_encoder", {}) and calls[3][0] == "engine-unet" and calls[3][1] != first[1][1]
    pipe.loras.activate([(lora_file, 0.8)])
    pipe.engine("unet")
    assert calls[4] == first[1]  # A -> B -> A: the same merged arrays as the first time


def _model_of(engine_dir):
    import json as _json

    return _json.loads((engine_dir / "manifest.json").read_text())["source"]["path"]
