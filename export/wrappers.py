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
from sdrt.specs import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER, ModelDims, build_specs

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                       "LatentConsistencyModelPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusionXLInpaintPipeline")
SDXL_PIPELINE = "StableDiffusionXLPipeline"
SDXL_PIPELINES = (SDXL_PIPELINE, "StableDiffusionXLInpaintPipeline")  # the latter: 9-channel inpainting UNets
SUPPORTED_UNETS = ("UNet2DConditionModel",)
SUPPORTED_VAES = ("AutoencoderKL",)
SUPPORTED_TEXT_ENCODERS = ("CLIPTextModel",)
SUPPORTED_TEXT_ENCODERS_2 = ("CLIPTextModelWithProjection",)
CLIP_EOS_ID = 49407


class TextEncoderWrapper(torch.nn.Module):
    """input_ids (int32) -> the spec's outputs: last_hidden_state, pooler_output, text_embeds (projected,
    CLIPTextModelWithProjection) and hidden_states (the penultimate layer, as SDXL's pipelines use)."""

    def __init__(self, text_encoder, output_names):
        super().__init__()
        self.text_encoder, self.output_names = text_encoder, tuple(output_names)

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        return tuple(out.hidden_states[-2] if name == "hidden_states" else out[name] for name in self.output_names)


class UNetWrapper(torch.nn.Module):
    """(sample, timestep (batch,) float32, encoder_hidden_states[, timestep_cond][, text_embeds, time_ids])
    -> out_sample; timestep_cond is LCM's guidance embedding, text_embeds/time_ids SDXL's added_cond_kwargs."""

    def __init__(self, unet, input_names):
        super().__init__()
        self.unet, self.input_names = unet, tuple(input_names)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        named = dict(zip(self.input_names[3:], extra))
        added = {k: named.pop(k) for k in ("text_embeds", "time_ids") if k in named}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added or None, return_dict=False, **named)[0]


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


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def model_folder(path, class_name: str, label: str, hint: str = "") -> tuple[Path, dict]:
    """(folder, config) of a diffusers model folder holding a ``class_name`` with its weights; ``ModelError``
    naming ``label`` (what the user passed it as) otherwise; ``hint`` follows the "does not exist" message."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"{label} folder {folder} does not exist{hint}")
    config = read_json(folder / "config.json")
    if config.get("_class_name") != class_name:
        raise ModelError(f"{folder} holds a {config.get('_class_name') or 'model without _class_name'}, "
                         f"not the {class_name} a {label} folder holds")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{folder} has no {' or '.join(WEIGHT_FILES)}")
    return folder, config


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


def _text_config(path: Path, supported: tuple[str, ...]) -> dict:
    config = read_json(path)
    archs = config.get("architectures") or []
    if archs and not set(archs) & set(supported):
        raise ModelError(f"unsupported text encoder {archs[0]} in {path}; supported: {', '.join(supported)}")
    return config


# Few-step (adversarially distilled) models ship an Euler scheduler on trailing timesteps with epsilon
# prediction: stabilityai/sd-turbo and stabilityai/sdxl-turbo (EulerAncestralDiscreteScheduler). Base models
# ship leading/linspace spacing; zero-SNR fine-tunes use trailing with DDIM and v-prediction (not turbo).
TURBO_SCHEDULERS = ("EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler")


def is_turbo_scheduler(scheduler: dict) -> bool:
    """An SD-Turbo / SDXL-Turbo scheduler config: Euler (a), trailing spacing, epsilon prediction."""
    return scheduler.get("_class_name") in TURBO_SCHEDULERS and scheduler.get("timestep_spacing") == "trailing" \
        and scheduler.get("prediction_type", "epsilon") == "epsilon"


def detect_family(pipeline: str, unet: dict, text: dict, scheduler: dict) -> str:
    """sd15 | sd2 | sd-turbo | lcm | sdxl | sdxl-turbo from model_index's class and the configs (no user flag).
    SD2.x: the OpenCLIP-H text tower (hidden 1024, GELU; CLIP ViT-L has quick_gelu) feeding a UNet with
    cross_attention_dim of its width; LCM: the UNet's guidance embedding; Turbo: ``is_turbo_scheduler``."""
    turbo = is_turbo_scheduler(scheduler)
    if pipeline in SDXL_PIPELINES:
        return "sdxl-turbo" if turbo else "sdxl"
    if unet.get("time_cond_proj_dim") or pipeline == "LatentConsistencyModelPipeline":
        return "lcm"
    if text.get("hidden_size") == 1024 or text.get("hidden_act") == "gelu":  # OpenCLIP-H (SD2.x)
        return "sd-turbo" if turbo else "sd2"
    return "sd15"


def dims_from_model(model_dir: Path) -> ModelDims:
    """ModelDims of an SD1.x/2.x/LCM/SDXL pipeline folder, from model_index and the component configs."""
    unet_path, vae_path = model_dir / "unet" / "config.json", model_dir / "vae" / "config.json"
    unet, vae = read_json(unet_path), read_json(vae_path)
    text = _text_config(model_dir / "text_encoder" / "config.json", SUPPORTED_TEXT_ENCODERS)
    index_path, scheduler_path = model_dir / "model_index.json", model_dir / "scheduler" / "scheduler_config.json"
    pipeline = read_json(index_path).get("_class_name") if index_path.is_file() else None
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else {}
    _check_class(unet, unet_path, SUPPORTED_UNETS)
    _check_class(vae, vae_path, SUPPORTED_VAES)
    sdxl = pipeline in SDXL_PIPELINES
    text_2 = _text_config(model_dir / "text_encoder_2" / "config.json", SUPPORTED_TEXT_ENCODERS_2) if sdxl else {}
    problems = []
    if unet.get("class_embed_type") or unet.get("encoder_hid_dim_type") or (
            unet.get("addition_embed_type") != ("text_time" if sdxl else None)):
        problems.append("UNet with extra conditioning (addition/class/encoder_hid embeddings) outside an SDXL pipeline"
                        if not sdxl else f"SDXL UNet addition_embed_type {unet.get('addition_embed_type')!r}")
    in_channels, latent_channels = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if in_channels not in (latent_channels, 2 * latent_channels + 1):
        problems.append(f"UNet in_channels {in_channels} (expected {latent_channels} or "
                        f"{2 * latent_channels + 1} for inpainting)")
    if unet.get("out_channels", 4) != latent_channels:
        problems.append(f"UNet out_channels {unet.get('out_channels')} != VAE latent_channels {latent_channels}")
    cross = unet.get("cross_attention_dim", 1280)
    hidden = text.get("hidden_size", 512)
    hidden_2 = text_2.get("hidden_size", 0)
    if isinstance(cross, (list, tuple)) or cross != hidden + hidden_2:
        widths = f"{hidden} + {hidden_2}" if sdxl else f"{hidden}"
        problems.append(f"UNet cross_attention_dim {cross} != text encoder hidden_size {widths}")
    extra = {}
    if sdxl:
        extra = {"text_2_hidden_size": int(hidden_2), "text_embeds_dim": int(text_2.get("projection_dim", 512)),
                 "time_ids_dim": 6}
        expected = extra["text_embeds_dim"] + 6 * unet.get("addition_time_embed_dim", 256)
        if unet.get("projection_class_embeddings_input_dim") != expected:
            problems.append(f"UNet projection_class_embeddings_input_dim "
                            f"{unet.get('projection_class_embeddings_input_dim')} != {expected}")
    if problems:
        raise ModelError(f"unsupported architecture in {model_dir}: {'; '.join(problems)}; supported: "
                         "Stable Diffusion 1.x/2.x, LCM and SDXL (UNet2DConditionModel + AutoencoderKL + "
                         "CLIPTextModel[+ CLIPTextModelWithProjection])")
    return ModelDims(
        family=detect_family(pipeline, unet, text, scheduler),
        latent_channels=int(latent_channels),
        unet_in_channels=int(in_channels),
        text_max_length=int(text.get("max_position_embeddings", 77)),
        text_hidden_size=int(hidden),
        cross_attention_dim=int(cross),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [64, 128, 256, 512])) - 1),
        image_channels=int(vae.get("in_channels", 3)),
        time_cond_proj_dim=int(unet["time_cond_proj_dim"]) if unet.get("time_cond_proj_dim") else None,
        **extra,
    )


def unet_up_factor(model_dir: Path) -> int:
    """Latent sizes the UNet downsamples without remainder are multiples of this."""
    blocks = read_json(model_dir / "unet" / "config.json").get("block_out_channels", [1, 1, 1, 1])
    return 2 ** (len(blocks) - 1)


def load_component(model_dir: Path, name: str) -> torch.nn.Module:
    """The fp32, eval-mode torch wrapper of one component, with its spec's inputs and outputs."""
    spec = build_specs(dims_from_model(model_dir))[name]
    try:
        if name in (TEXT_ENCODER, TEXT_ENCODER_2):
            import transformers

            cls = transformers.CLIPTextModel if name == TEXT_ENCODER else transformers.CLIPTextModelWithProjection
            module = cls.from_pretrained(model_dir / name, torch_dtype=torch.float32, attn_implementation="eager")
            wrapper = TextEncoderWrapper(module, spec.output_names)
        elif name == UNET:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)
            wrapper = UNetWrapper(unet, spec.input_names)
        elif name in (VAE_DECODER, VAE_ENCODER):
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
            wrapper = VaeDecoderWrapper(vae) if name == VAE_DECODER else VaeEncoderWrapper(vae)
        else:
            raise KeyError(name)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot load {name} from {model_dir}: {exc}") from None
    return wrapper.eval().float()
