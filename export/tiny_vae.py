"""The tiny VAE (TAESD, diffusers' ``AutoencoderTiny``): random-weight folders and its export wrappers.

``sdrt make-model --arch taesd|taesdxl`` writes a folder ``AutoencoderTiny.from_pretrained`` reads (the
layout of madebyollin/taesd and madebyollin/taesdxl). ``sdrt export --tiny-vae DIR`` exports its decoder
and encoder beside the full VAE (``TINY_VAE_DECODER`` / ``TINY_VAE_ENCODER`` in ``sdrt.specs``), which
``--vae tiny`` uses as diffusers does after ``pipe.vae = AutoencoderTiny.from_pretrained(DIR)``.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import torch

from sdrt.errors import ModelError
from sdrt.specs import TINY_VAE_DECODER, TINY_VAE_ENCODER, ModelDims
from sdrt_export.wrappers import model_folder

log = logging.getLogger(__name__)

TINY_VAE_COMPONENTS = (TINY_VAE_DECODER, TINY_VAE_ENCODER)
CLASS_NAME = "AutoencoderTiny"


class TinyVaeDecoderWrapper(torch.nn.Module):
    """latent (already divided by the scaling factor, 1.0 for TAESD) -> images in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class TinyVaeEncoderWrapper(torch.nn.Module):
    """images in [-1, 1] -> latents (``AutoencoderTinyOutput.latents``: no distribution, nothing to sample)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images, return_dict=False)[0]


def validate_tiny_vae_dir(path, dims: ModelDims) -> tuple[Path, dict]:
    """The folder and config of an AutoencoderTiny whose latents fit this model; ``ModelError`` otherwise."""
    folder, config = model_folder(path, CLASS_NAME, "tiny VAE (TAESD)",
                                  " (write one with `sdrt make-model DIR --arch taesd`)")
    channels = int(config.get("latent_channels", 4))
    if channels != dims.latent_channels or int(config.get("in_channels", 3)) != dims.image_channels:
        raise ModelError(f"the tiny VAE in {folder} has {channels} latent channels, this model's VAE "
                         f"{dims.latent_channels}: use the TAESD made for this family (taesd, taesdxl)")
    return folder, config


def load_tiny_component(folder: Path, name: str) -> torch.nn.Module:
    """The fp32, eval-mode wrapper of the tiny VAE's decoder or encoder."""
    from diffusers import AutoencoderTiny

    try:
        vae = AutoencoderTiny.from_pretrained(folder, torch_dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot load the tiny VAE from {folder}: {exc}") from None
    wrapper = TinyVaeDecoderWrapper(vae) if name == TINY_VAE_DECODER else TinyVaeEncoderWrapper(vae)
    return wrapper.eval().float()


def manifest_section(folder: Path, config: dict, sha256: str) -> dict:
    """The manifest's ``tiny_vae`` entry: where it came from and the factors the pipelines apply."""
    return {"source": {"path": str(folder.absolute()), "sha256": sha256}, "class_name": CLASS_NAME,
            "scaling_factor": float(config.get("scaling_factor") or 1.0),
            "shift_factor": config.get("shift_factor")}


# --- random weights (sdrt make-model --arch taesd) ------------------------------------------------------------

def write_tiny_autoencoder(folder: Path, config: dict, seed: int, save_weights) -> None:
    """An AutoencoderTiny with ``config`` and non-degenerate random weights (see ``init_weights``)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(**config).eval()
    init_weights(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    # diffusers re-registers block_out_channels itself; the madebyollin configs do not store it
    path = folder / "config.json"
    saved = json.loads(path.read_text())
    saved.pop("block_out_channels", None)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    save_weights(model, folder / "diffusion_pytorch_model.safetensors")
    del model
    gc.collect()


def init_weights(model, seed: int) -> None:
    """torch's default init leaves TAESD's decoder near-constant (-0.97 +- 0.03: black images whatever the
    latents). Instead: He-normal convs, the residual branch's last conv halved, and each output conv set so
    a fixed random probe gives trained-like statistics (decoder's [0, 1] image mean 0.5, std 0.2; encoder's
    latents mean 0, std 1), per channel. Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    channels = model.config.latent_channels
    with torch.no_grad():
        probes = ((model.decoder, torch.randn(1, channels, 16, 16, generator=gen), 0.5, 0.2),
                  (model.encoder, torch.rand(1, model.config.in_channels, 128, 128, generator=gen) * 2 - 1, 0.0, 1.0))
        for part, probe, mean, std in probes:
            for module in part.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
                    if module.bias is not None:
                        module.bias.zero_()
                if type(module).__name__ == "AutoencoderTinyBlock":
                    module.conv[-1].weight.mul_(0.5)
            last, seen = part.layers[-1], []
            hook = last.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
            part(probe)
            hook.remove()
            mu, sigma = seen[0].mean((0, 2, 3)), seen[0].std((0, 2, 3)).clamp_min(1e-6)
            last.weight.mul_((std / sigma)[:, None, None, None])
            last.bias.copy_(mean - mu * std / sigma)
