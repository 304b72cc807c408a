"""ControlNet export (``sdrt export --controlnet DIR``): one ``controlnet_<k>`` graph per net and ``unet_control``.

Each ControlNet (diffusers' ``ControlNetModel``, Zhang et al. 2023) is exported on its own, with the
spec's inputs (``sdrt.specs._controlnets``), so requests mix nets, scales, start/end and guess mode at run
time; ``unet_control`` is the model's UNet taking the residuals (``down_block_additional_residuals``,
``mid_block_additional_residual``) as inputs, beside the plain UNet that serves requests without control.
The residual layout (channels and down-sampling of each residual: 12 + 1 for SD1.x/2.x, 9 + 1 for SDXL) is
derived from the UNet's config and every ControlNet must produce exactly it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from sdrt.errors import ModelError
from sdrt.specs import CONTROLNET_PREFIX, UNET, UNET_CONTROL, ModelDims, build_specs, control_components
from sdrt_export.wrappers import UNetWrapper, read_json

log = logging.getLogger(__name__)

CLASS_NAME = "ControlNetModel"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# config keys that must equal the UNet's for the residuals (and the SDXL added conditioning) to fit
MATCHING_KEYS = ("block_out_channels", "cross_attention_dim", "addition_embed_type",
                 "projection_class_embeddings_input_dim")


def residual_layout(config: dict) -> tuple[tuple[int, int], ...]:
    """(channels, down-samplings) of each down-block residual, then of the mid block, as diffusers'
    ``ControlNetModel`` builds ``controlnet_down_blocks``: conv_in, every resnet layer, every down-sampler."""
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    out = [(channels[0], 0)]
    for level, (width, count) in enumerate(zip(channels, layers)):
        out += [(width, level)] * count
        if level < len(channels) - 1:
            out.append((width, level + 1))
    return tuple(out) + ((channels[-1], len(channels) - 1),)


def validate_controlnet_dirs(paths, model_dir: Path, dims: ModelDims) -> list[tuple[Path, dict]]:
    """Each folder and config, after checking it is a ControlNetModel of this model's family (same residual
    layout, cross-attention width and SDXL conditioning as the UNet); ``ModelError`` otherwise."""
    unet = read_json(model_dir / "unet" / "config.json")
    out = []
    for path in paths:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelError(f"ControlNet folder {folder} does not exist")
        config = read_json(folder / "config.json")
        if config.get("_class_name") != CLASS_NAME:
            raise ModelError(f"{folder} holds a {config.get('_class_name') or 'model without _class_name'}, "
                             f"not a {CLASS_NAME}")
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise ModelError(f"{folder} has no {' or '.join(WEIGHT_FILES)}")
        problems = [f"{key} {config.get(key)!r} (the UNet's: {unet.get(key)!r})" for key in MATCHING_KEYS
                    if _norm(config.get(key)) != _norm(unet.get(key))]
        if residual_layout(config) != residual_layout(unet):
            problems.append(f"{len(residual_layout(config))} residuals of other shapes than the UNet's "
                            f"{len(residual_layout(unet))}")
        if not problems and config.get("in_channels", 4) != dims.latent_channels:
            problems.append(f"in_channels {config.get('in_channels')} (the latents have {dims.latent_channels})")
        if not problems and config.get("conditioning_channels", 3) != dims.image_channels:
            problems.append(f"conditioning_channels {config.get('conditioning_channels')} "
                            f"(supported: {dims.image_channels}, RGB)")
        if not problems and config.get("global_pool_conditions"):
            problems.append("global_pool_conditions (pooled residuals) is not supported")
        if problems:
            raise ModelError(f"ControlNet {folder} does not fit this {dims.family} model: {'; '.join(problems)}")
        out.append((folder, config))
    return out


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def with_controlnets(dims: ModelDims, model_dir: Path, count: int) -> ModelDims:
    return replace(dims, controlnets=count,
                   control_residuals=residual_layout(read_json(model_dir / "unet" / "config.json")))


def is_control_component(name: str) -> bool:
    return name == UNET_CONTROL or name.startswith(CONTROLNET_PREFIX)


def island_policy(name: str) -> str:
    """The component whose fp16 islands (``fp16.ISLANDS``) a component takes: ControlNets and ``unet_control``
    are UNets (timestep embedding, norms, softmax in fp32)."""
    return UNET if is_control_component(name) else name


class ControlNetWrapper(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale (one per residual)
    [, text_embeds, time_ids]) -> down residuals..., mid residual, each times its factor. diffusers multiplies
    by ``conditioning_scale`` (guess mode: by ``logspace(-1, 0, n) * conditioning_scale``); here the runtime
    passes those factors, and the net runs at scale 1.0."""

    def __init__(self, controlnet, input_names):
        super().__init__()
        self.controlnet, self.input_names = controlnet, tuple(input_names)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *extra):
        added = dict(zip(self.input_names[5:], extra))
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                                    added_cond_kwargs=added or None, return_dict=False)
        return tuple(r * conditioning_scale[i] for i, r in enumerate((*down, mid)))


class ControlledUNetWrapper(UNetWrapper):
    """The UNet's inputs, then the residuals -> out_sample (``down_block_additional_residuals`` and
    ``mid_block_additional_residual`` of ``UNet2DConditionModel.forward``)."""

    def __init__(self, unet, unet_inputs, residuals: int):
        super().__init__(unet, unet_inputs)
        self.residuals = residuals

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        extra, res = rest[:len(rest) - self.residuals], rest[len(rest) - self.residuals:]
        named = dict(zip(self.input_names[3:], extra))
        added = {k: named.pop(k) for k in ("text_embeds", "time_ids") if k in named}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added or None, down_block_additional_residuals=tuple(res[:-1]),
                         mid_block_additional_residual=res[-1], return_dict=False, **named)[0]


def load_control_component(model_dir: Path, controls: list, dims: ModelDims, name: str) -> torch.nn.Module:
    """The fp32 torch wrapper of ``controlnet_<k>`` (the k-th ``--controlnet``) or ``unet_control``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    specs = build_specs(dims)
    try:
        if name == UNET_CONTROL:
            unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)
            wrapper = ControlledUNetWrapper(unet, specs[UNET].input_names, len(dims.control_residuals))
        else:
            folder = controls[int(name[len(CONTROLNET_PREFIX):])][0]
            net = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32)
            wrapper = ControlNetWrapper(net, specs[name].input_names)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot load {name}: {exc}") from None
    return wrapper.eval().float()


def manifest_section(controls: list, hash_folder) -> list[dict]:
    """One record per ControlNet, in ``controlnet_<k>`` order: its source folder and content hash."""
    return [{"component": name, "path": str(folder.absolute()), "sha256": hash_folder(folder)}
            for name, (folder, _) in zip(control_components({"controlnets": len(controls)}), controls)]


def write_random_controlnet(model_dir, out, seed: int = 0) -> Path:
    """A ControlNet for the pipeline in ``model_dir``: ``ControlNetModel.from_unet`` (weights from the UNet),
    then its zero convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``,
    ``controlnet_cond_embedding.conv_out``) re-initialized under ``seed``: a fresh ControlNet outputs exactly
    zero residuals, so it would control nothing (tests, demos)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", torch_dtype=torch.float32)
    net = ControlNetModel.from_unet(unet)
    for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        conv.reset_parameters()
    net.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
