"""Torch modules whose forward signature is exactly a component spec's inputs and outputs.

Each wrapper takes the spec's input tensors positionally (in spec order) and returns the spec's
outputs as a tuple (in spec order), so ``torch.onnx.export`` with the spec's names produces a graph
the runtime can feed by name. ``load_component`` loads one diffusers/transformers module in fp32
from a pipeline folder; ``dims_from_model`` derives ``ModelDims`` from the configs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sdrt.errors import ModelError
from sdrt.specs import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, ModelDims

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
SUPPORTED_UNETS = ("UNet2DConditionModel",)
SUPPORTED_VAES = ("AutoencoderKL",)
SUPPORTED_TEXT_ENCODERS = ("CLIPTextModel",)
CLIP_EOS_ID = 49407


class TextEncoderWrapper(torch.nn.Module):
    """input_ids (int32) -> (last_hidden_state, pooler_output)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids.to(torch.int64), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNetWrapper(torch.nn.Module):
    """(sample, timestep (batch,) float32, encoder_hidden_states) -> out_sample."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(torch.nn.Module):
    """latent (already divided by the scaling factor by the caller) -> images in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """images -> posterior (mean, logvar): the deterministic moments; the runtime samples."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        posterior = self.vae.encode(images, return_dict=False)[0]
        return posterior.mean, posterior.logvar


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing; the model folder is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def _check_class(config: dict, path: Path, supported: tuple[str, ...]) -> None:
    name = config.get("_class_name")
    if name is not None and name not in supported:
        raise ModelError(f"unsupported architecture {name} in {path}; supported: {', '.join(supported)}")


def dims_from_model(model_dir: Path) -> ModelDims:
    """ModelDims of an SD1.x/2.x-style pipeline folder, from the unet, vae and text_encoder configs."""
    unet_path, vae_path = model_dir / "unet" / "config.json", model_dir / "vae" / "config.json"
    text_path = model_dir / "text_encoder" / "config.json"
    unet, vae, text = read_json(unet_path), read_json(vae_path), read_json(text_path)
    _check_class(unet, unet_path, SUPPORTED_UNETS)
    _check_class(vae, vae_path, SUPPORTED_VAES)
    archs = text.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_TEXT_ENCODERS):
        raise ModelError(f"unsupported text encoder {archs[0]} in {text_path}; supported: "
                         f"{', '.join(SUPPORTED_TEXT_ENCODERS)}")
    problems = []
    if unet.get("addition_embed_type") or unet.get("class_embed_type") or unet.get("encoder_hid_dim_type"):
        problems.append("UNet with extra conditioning (addition/class/encoder_hid embeddings, e.g. SDXL)")
    in_channels, latent_channels = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if in_channels not in (latent_channels, 2 * latent_channels + 1):
        problems.append(f"UNet in_channels {in_channels} (expected {latent_channels} or "
                        f"{2 * latent_channels + 1} for inpainting)")
    if unet.get("out_channels", 4) != latent_channels:
        problems.append(f"UNet out_channels {unet.get('out_channels')} != VAE latent_channels {latent_channels}")
    cross = unet.get("cross_attention_dim", 1280)
    hidden = text.get("hidden_size", 512)
    if isinstance(cross, (list, tuple)) or cross != hidden:
        problems.append(f"UNet cross_attention_dim {cross} != text encoder hidden_size {hidden}")
    if problems:
        raise ModelError(f"unsupported architecture in {model_dir}: {'; '.join(problems)}; supported: "
                         "Stable Diffusion 1.x/2.x (UNet2DConditionModel + AutoencoderKL + CLIPTextModel)")
    return ModelDims(
        family="sd15",
        latent_channels=int(latent_channels),
        unet_in_channels=int(in_channels),
        text_max_length=int(text.get("max_position_embeddings", 77)),
        text_hidden_size=int(hidden),
        cross_attention_dim=int(cross),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [64, 128, 256, 512])) - 1),
        image_channels=int(vae.get("in_channels", 3)),
    )


def unet_up_factor(model_dir: Path) -> int:
    """Latent sizes the UNet downsamples without remainder are multiples of this."""
    blocks = read_json(model_dir / "unet" / "config.json").get("block_out_channels", [1, 1, 1, 1])
    return 2 ** (len(blocks) - 1)


def load_component(model_dir: Path, name: str) -> torch.nn.Module:
    """The fp32, eval-mode torch wrapper of one component."""
    try:
        if name == TEXT_ENCODER:
            from transformers import CLIPTextModel

            module = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32,
                                                   attn_implementation="eager")
            wrapper = TextEncoderWrapper(module)
        elif name == UNET:
            from diffusers import UNet2DConditionModel

            wrapper = UNetWrapper(UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32))
        elif name in (VAE_DECODER, VAE_ENCODER):
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
            wrapper = VaeDecoderWrapper(vae) if name == VAE_DECODER else VaeEncoderWrapper(vae)
        else:
            raise KeyError(name)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot load {name} from {model_dir}: {exc}") from None
    return wrapper.eval().float()
