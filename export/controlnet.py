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
from sdrt_export.wrappers import UNetWrapper, model_folder, read_json

log = logging.getLogger(__name__)

CLASS_NAME = "ControlNetModel"
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
        folder, config = model_folder(path, CLASS_NAME, "ControlNet")
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
        factor = 2 ** (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
        if not problems and factor != dims.vae_scale_factor:
            problems.append(f"its conditioning embedding down-samples by {factor}, the VAE by {dims.vae_scale_factor}")
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
    zero residuals, so it would control nothing (tests, demos). The conditioning embedding's convolutions get
    He-normal weights (std sqrt(2 / fan_in)): with torch's default init its eight layers shrink the control
    image's signal ~100x, and the image would barely change the result."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", torch_dtype=torch.float32)
    net = ControlNetModel.from_unet(unet)
    for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        conv.reset_parameters()
    for conv in net.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    net.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


# --- the diffusers reference (tests, ``sdrt verify --controlnet``) -------------------------------------------

REFERENCE_PIPELINES = {
    ("sd", "txt2img"): "StableDiffusionControlNetPipeline",
    ("sd", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


def load_reference(model_dir, controlnet_dirs, mode: str = "txt2img"):
    """diffusers' ControlNet pipeline for ``mode`` (fp32, CPU, no safety checker), with one ControlNetModel,
    or a MultiControlNetModel over several in ``controlnet_dirs`` order."""
    import diffusers

    model_dir = Path(model_dir)
    sdxl = "XL" in read_json(model_dir / "model_index.json").get("_class_name", "")
    nets = [diffusers.ControlNetModel.from_pretrained(str(d), torch_dtype=torch.float32) for d in controlnet_dirs]
    cls = getattr(diffusers, REFERENCE_PIPELINES["sdxl" if sdxl else "sd", mode])
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(model_dir), controlnet=nets[0] if len(nets) == 1 else nets,
                               torch_dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe, mode: str, prompt: str, *, control_images, control_scales=1.0, control_start=0.0,
                     control_end=1.0, guess_mode=False, steps: int, guidance: float, seed: int, width: int,
                     height: int, negative_prompt: str = "", batch: int = 1, image=None, mask=None,
                     strength: float = 1.0):
    """diffusers' float images in [0, 1], (N, H, W, 3), for the same request as sdrt's ``control_*`` kwargs."""
    import numpy as np

    single = len(control_images) == 1
    control = control_images[0] if single else list(control_images)
    scales = control_scales if not isinstance(control_scales, (list, tuple)) else \
        (control_scales[0] if single else list(control_scales))
    kwargs = dict(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                  guidance_scale=guidance, num_images_per_prompt=batch, output_type="np", width=width, height=height,
                  generator=torch.Generator("cpu").manual_seed(seed), controlnet_conditioning_scale=float(scales)
                  if not isinstance(scales, list) else [float(s) for s in scales],
                  control_guidance_start=control_start, control_guidance_end=control_end, guess_mode=guess_mode)
    if mode == "txt2img":
        kwargs["image"] = control
    else:
        kwargs.update(image=image, control_image=control, strength=strength)
        if mode == "inpaint":
            kwargs["mask_image"] = mask
    with torch.no_grad():
        return np.asarray(pipe(**kwargs).images, dtype=np.float32)


def verify_inputs(controlnet_dirs, control_images, width: int, height: int) -> dict:
    """``sdrt verify --controlnet``: the control images (given, or synthetic pictures), {} without ControlNets."""
    if not controlnet_dirs:
        return {}
    if control_images:
        return {"control_images": list(control_images)}
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    return {"control_images": [Image.fromarray((np.stack([x, y, ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.04 * (k + 1))
                                                          * 1.0], -1) * 255).astype(np.uint8))
                               for k in range(len(controlnet_dirs))]}


def stage_errors(pipe, sdrt_pipe, width: int, height: int, seed: int) -> dict:
    """Relative L2 of each ControlNet engine and of ``unet_control`` against diffusers' modules, on random feeds."""
    import numpy as np

    from sdrt.specs import controlnet_name

    rng = np.random.default_rng(seed)
    specs = sdrt_pipe.manifest.specs
    nets = getattr(pipe.controlnet, "nets", [pipe.controlnet])
    out = {}

    def feeds_for(spec):
        feeds = {t.name: rng.standard_normal(t.shape(2, height, width), dtype=np.float32) for t in spec.inputs}
        feeds["timestep"] = np.array([981.0, 981.0], dtype=np.float32)
        return feeds

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))

    with torch.no_grad():
        for k, net in enumerate(nets):
            feeds = feeds_for(specs[controlnet_name(k)])
            got = sdrt_pipe.engine(controlnet_name(k))(feeds)
            t = {name: torch.from_numpy(v) for name, v in feeds.items()}
            added = {name: t[name] for name in ("text_embeds", "time_ids") if name in t}
            down, mid = net(t["sample"], t["timestep"], t["encoder_hidden_states"], t["controlnet_cond"],
                            added_cond_kwargs=added or None, return_dict=False)
            want = [r.numpy() * s for r, s in zip((*down, mid), feeds["conditioning_scale"])]
            out[controlnet_name(k)] = max(rel(got[n], w) for n, w in zip(specs[controlnet_name(k)].output_names,
                                                                          want))
        feeds = feeds_for(specs[UNET_CONTROL])
        t = {name: torch.from_numpy(v) for name, v in feeds.items()}
        residuals = [t.pop(n) for n in specs[UNET_CONTROL].input_names[len(specs[UNET].inputs):]]
        added = {name: t.pop(name) for name in ("text_embeds", "time_ids") if name in t}
        want = pipe.unet(t.pop("sample"), t.pop("timestep"), t.pop("encoder_hidden_states"),
                         added_cond_kwargs=added or None, down_block_additional_residuals=tuple(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1], **t).sample.numpy()
        out[UNET_CONTROL] = rel(sdrt_pipe.engine(UNET_CONTROL)(feeds)["out_sample"], want)
    return out
