"""sdrt make-model: random-weight diffusers pipelines (sdrt_export.make_model)."""

from __future__ import annotations

import errno
import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sdrt import cli  # noqa: E402
from sdrt.errors import ExportError, InputError, OutputExistsError  # noqa: E402
from sdrt_export import make_model as mm  # noqa: E402


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_layout(tiny_model_dir):
    names = set(_hashes(tiny_model_dir))
    assert names == {
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
    }
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    sched = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    sched.pop("_diffusers_version")
    assert sched == {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    }
    tok = json.loads((tiny_model_dir / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 77 and tok["pad_token"] == "<|endoftext|>"
    assert tok["tokenizer_class"] == "CLIPTokenizer" and tok["do_lower_case"] is True


def test_same_seed_is_byte_identical(tiny_model_dir, tmp_path):
    again = mm.make_model(tmp_path / "again", arch="tiny", seed=0)
    assert _hashes(again) == _hashes(tiny_model_dir)


def test_force_replaces_and_seed_changes_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert mm.make_model(out, arch="tiny", seed=1, force=True) == out
    assert not (out / "stale.txt").exists()
    assert _siblings(out) == []  # no temp or old dirs left behind
    new, ref = _hashes(out), _hashes(tiny_model_dir)
    assert new.keys() == ref.keys()
    for name in new:
        assert (new[name] == ref[name]) == (not name.endswith(".safetensors")), name


def test_existing_dir_is_refused_untouched(tiny_model_dir):
    before = _hashes(tiny_model_dir)
    siblings = _siblings(tiny_model_dir)
    with pytest.raises(OutputExistsError, match="--force"):
        mm.make_model(tiny_model_dir, arch="tiny")
    assert _hashes(tiny_model_dir) == before and _siblings(tiny_model_dir) == siblings


def test_unknown_arch(tmp_path):
    with pytest.raises(InputError, match="sd15.*tiny"):
        mm.make_model(tmp_path / "m", arch="sd9")
    assert not (tmp_path / "m").exists()


def test_disk_error_leaves_nothing(tmp_path, monkeypatch):
    def full(folder):
        (folder / "partial").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mm, "_write_tokenizer", full)
    with pytest.raises(ExportError, match="No space left on device") as info:
        mm.make_model(tmp_path / "m", arch="tiny")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_existing_dir_exits_2_one_line(tiny_model_dir, capsys):
    assert cli.main(["make-model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and "Traceback" not in err


def test_pipeline_loads_and_generates(tiny_model_dir):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 and pipe.safety_checker is None
    gen = torch.Generator().manual_seed(0)
    image = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=gen).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    latent = pipe("a photo of a cat", num_inference_steps=1, height=64, width=96, output_type="latent",
                  generator=gen).images
    assert tuple(latent.shape) == (1, 4, 8, 12)


@torch.no_grad()
def test_unet_depends_on_text_and_timestep(tiny_model_dir):
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    text = transformers.CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder")
    ids = [[49406, 320, 1125, 539, 320, 2368] + [49407] * 71, [49406, 320, 1125, 539, 320, 1929] + [49407] * 71]
    emb = text(torch.tensor(ids)).last_hidden_state
    assert emb.shape == (2, 77, unet.config.cross_attention_dim)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    out = unet(x, 10, emb).sample
    later = unet(x, 900, emb).sample
    scale = out.std().item()
    assert scale > 0.01 and torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max().item() > 1e-3 * scale
    assert (out - later).abs().max().item() > 1e-2 * scale


def test_sd15_param_counts_on_meta():
    arch = mm.ARCHS["sd15"]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**arch["unet"])
        vae = diffusers.AutoencoderKL(**arch["vae"])
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**arch["text_encoder"]))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, text, vae)]
    assert counts == [859_520_964, 123_060_480, 83_653_863]
    assert all(p.is_meta for m in (unet, text, vae) for p in m.parameters())


def test_tokenizer_ids(tiny_model_dir):
    tok = transformers.CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer", local_files_only=True)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
