"""Write random-weight diffusers Stable Diffusion folders (``sdrt make-model``).

Architectures are plain data in ``archs.ARCHS``: per arch the pipeline class, the UNet, VAE and CLIP
text encoder configs, the scheduler and tokenizer configs; a new family is one more entry. Weights
are torch's default init under a fixed seed (text_encoder_2: seed + 1), saved with safetensors, so
the same seed gives byte-identical files.
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
from sdrt_export.archs import ARCHS, TOKENIZER_CONFIG

log = logging.getLogger(__name__)

TOKENIZER_DATA = Path(__file__).parent / "data" / "clip_tokenizer"


def make_model(out_dir, arch: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write a random-weight diffusers SD pipeline folder for ``arch`` to ``out_dir`` (for ``taesd`` /
    ``taesdxl`` an ``AutoencoderTiny`` folder); return it."""
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
        if "autoencoder_tiny" in ARCHS[arch]:  # taesd, taesdxl: an AutoencoderTiny folder, not a pipeline
            from sdrt_export.tiny_vae import write_tiny_autoencoder

            write_tiny_autoencoder(tmp, ARCHS[arch]["autoencoder_tiny"], seed, _save_weights)
        elif "kandinsky" in ARCHS[arch]:  # two pipeline folders, OUT/prior and OUT/decoder
            from sdrt_export.kandinsky_make import write_kandinsky

            write_kandinsky(tmp, ARCHS[arch]["kandinsky"], seed)
        else:
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

    pipeline, scheduler = arch["pipeline"], arch["scheduler"]
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    _write_text_encoder(root / "text_encoder", arch["text_encoder"], seed, "CLIPTextModel")
    _write_tokenizer(root / "tokenizer")
    _write_tokenizer_config(root / "tokenizer", arch["tokenizer"])
    if "text_encoder_2" in arch:
        _write_text_encoder(root / "text_encoder_2", arch["text_encoder_2"], seed + 1, "CLIPTextModelWithProjection")
        _write_tokenizer(root / "tokenizer_2")
        _write_tokenizer_config(root / "tokenizer_2", arch["tokenizer_2"])
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    for name, cls in (("vae", diffusers.AutoencoderKL), ("unet", diffusers.UNet2DConditionModel)):
        _write_diffusers_model(root / name, cls, arch[name], seed)
    _write_json(root / "scheduler" / "scheduler_config.json",
                {**scheduler, "_diffusers_version": diffusers.__version__})
    _write_json(root / "model_index.json", index)


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


def _write_text_encoder(folder: Path, config: dict, seed: int, class_name: str) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(transformers.CLIPTextConfig(**config, architectures=[class_name]))
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
    _write_tokenizer_config(folder, TOKENIZER_CONFIG)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        # Loaded from a folder: transformers 5's CLIPTokenizer(vocab_file=, merges_file=) builds an empty vocab.
        CLIPTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(scratch)
        shutil.copyfile(Path(scratch) / "tokenizer.json", folder / "tokenizer.json")


def _write_tokenizer_config(folder: Path, config: dict) -> None:
    """The slow-tokenizer configs; the pad token is per family (SD1.x ``<|endoftext|>``, SD2 ``!``)."""
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json",
                {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
