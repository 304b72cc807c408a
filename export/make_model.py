"""Write random-weight diffusers Stable Diffusion folders (``sdrt make-model``).

Architectures are plain data in ``ARCHS``: one dict per family with the UNet, VAE and CLIP text
encoder configs; a new family (SD2, SDXL, LCM) is one more entry. Weights are torch's default
init under a fixed seed, saved with safetensors, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sdrt.errors import ExportError, InputError, OutputExistsError

log = logging.getLogger(__name__)

TOKENIZER_DATA = Path(__file__).parent / "data" / "clip_tokenizer"

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD15_VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower. bos/eos/pad ids as in SD1.5's config (eos 2 = pool at argmax id).
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

ARCHS: dict[str, dict] = {
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT},
    "tiny": {
        "unet": {
            **SD15_UNET,
            "sample_size": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64],
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        "vae": {
            **SD15_VAE,
            "sample_size": 64,
            "block_out_channels": [32, 32, 64, 64],
            "layers_per_block": 1,
            "norm_num_groups": 8,
        },
        "text_encoder": {
            **SD15_TEXT,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
    },
}

# sd15 with a 9-channel UNet (latent + mask + masked-image latent), as SD1.5-inpainting
ARCHS["tiny-inpaint"] = {**ARCHS["tiny"], "unet": {**ARCHS["tiny"]["unet"], "in_channels": 9},
                         "pipeline": "StableDiffusionInpaintPipeline"}

SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

TOKENIZER_CONFIG = {
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
SPECIAL_TOKENS = {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}


def make_model(out_dir, arch: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write a random-weight diffusers SD pipeline folder for ``arch`` to ``out_dir``; return it."""
    if arch not in ARCHS:
        raise InputError(f"unknown arch {arch!r} (known: {', '.join(sorted(ARCHS))})")
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out} already exists (pass --force to replace it)")
    log.info("writing a random-weight %s model (seed %d) to %s", arch, seed, out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        _write_pipeline(tmp, ARCHS[arch], seed)
        _set_modes(tmp)
        _replace(tmp, out)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _set_modes(root: Path) -> None:
    """Give the tree ordinary umask modes (mkdtemp and safetensors create owner-only ones)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _replace(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``, swapping out an existing ``out`` so a failure leaves it intact."""
    if not (out.exists() or out.is_symlink()):
        os.rename(new, out)
        return
    graveyard = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.rename(out, graveyard / "old")
        try:
            os.rename(new, out)
        except OSError:
            os.rename(graveyard / "old", out)
            raise
    finally:
        shutil.rmtree(graveyard, ignore_errors=True)


def _write_pipeline(root: Path, arch: dict, seed: int) -> None:
    import diffusers

    _write_text_encoder(root / "text_encoder", arch["text_encoder"], seed)
    for name, cls in (("vae", diffusers.AutoencoderKL), ("unet", diffusers.UNet2DConditionModel)):
        _write_diffusers_model(root / name, cls, arch[name], seed)
    _write_tokenizer(root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json",
                {**SCHEDULER, "_diffusers_version": diffusers.__version__})
    _write_json(root / "model_index.json", {
        "_class_name": arch.get("pipeline", "StableDiffusionPipeline"),
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", SCHEDULER["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


def _save_weights(module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    n = sum(v.numel() for v in state.values())
    log.info("  %s: %.1f M params, %.1f MB", path.parent.name, n / 1e6, path.stat().st_size / 1e6)


def _write_diffusers_model(folder: Path, cls, config: dict, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model = cls(**config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    _save_weights(model, folder / "diffusion_pytorch_model.safetensors")
    del model
    gc.collect()


def _write_text_encoder(folder: Path, config: dict, seed: int) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**config, architectures=["CLIPTextModel"]))
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    _save_weights(model, folder / "model.safetensors")
    del model
    gc.collect()


def _write_tokenizer(folder: Path) -> None:
    """CLIP BPE vocab + merges, the slow-tokenizer configs and the fast ``tokenizer.json``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DATA / name, folder / name)
    _write_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        # Loaded from a folder: transformers 5's CLIPTokenizer(vocab_file=, merges_file=) builds an empty vocab.
        CLIPTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(scratch)
        shutil.copyfile(Path(scratch) / "tokenizer.json", folder / "tokenizer.json")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
