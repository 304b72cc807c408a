"""``sdrt verify``: sdrt against the diffusers pipeline (torch, fp32) on the same inputs and seed.

Reports per-stage errors (text embeddings, one UNet call, VAE decode, VAE encode) and the final
image's max abs error and PSNR; ``failed`` is set past tolerance (the CLI then exits 1). The request
is txt2img, or inpaint (a synthetic image and mask) for models with a 9-channel inpainting UNet.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from sdrt import schedulers
from sdrt.errors import ModelError
from sdrt.pipeline import Pipeline, default_inpaint_strength
from sdrt.specs import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER
from sdrt_export import controlnet

log = logging.getLogger(__name__)

# bf16 (OpenVINO's own choice on AVX512_BF16 CPUs, --backend openvino): 8 mantissa bits against fp16's 11, no
# fp32 islands. Measured on the tiny model, 128², 8 steps: UNet rel L2 3.0e-2 (sd15-shaped 256²: 2.3e-2), VAE
# decode 2.0e-2, image max abs 0.014 (PNDM) / 0.033 (Euler a); the bounds are about twice (stages) and three
# times (image) that.
BF16_IMAGE, BF16_STAGE = 0.1, 6e-2
IMAGE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": BF16_IMAGE}
STAGE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": BF16_STAGE}  # relative L2 per stage


AUTO_PIPELINES = {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
                  "inpaint": "AutoPipelineForInpainting"}
SD_PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                "inpaint": "StableDiffusionInpaintPipeline"}


def load_reference(model_dir: str | Path, mode: str = "txt2img", scheduler: str | None = None):
    """The diffusers pipeline matching the model folder's model_index class and ``mode``, fp32 on the CPU,
    no safety checker. An LCM folder run with another scheduler (or inpainting) gets the StableDiffusion
    class for ``mode``, which also feeds ``timestep_cond``; LatentConsistencyModelPipeline only drives
    LCMScheduler (it skips ``scale_model_input``)."""
    import diffusers

    _quiet_diffusers()
    index_path = Path(model_dir) / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    class_name = json.loads(index_path.read_text()).get("_class_name", "")
    lcm = class_name.startswith("LatentConsistencyModel")
    other_scheduler = scheduler is not None and schedulers.resolve(scheduler)[0] != "LCMScheduler"
    cls = getattr(diffusers, SD_PIPELINES[mode] if lcm and (other_scheduler or mode == "inpaint")
                  else AUTO_PIPELINES[mode])
    extra = {} if "XL" in class_name else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(model_dir), dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quiet_diffusers() -> None:
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def use_scheduler(pipe, name: str | None) -> None:
    """Give a diffusers pipeline the scheduler sdrt picks for ``name`` (same class and overrides)."""
    if name is None:
        return
    import diffusers

    class_name, overrides = schedulers.resolve(name)
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)


def reference_images(pipe, mode: str, prompt: str, *, negative_prompt: str = "", steps: int, guidance: float,
                     seed: int, width: int, height: int, batch: int = 1, image=None, mask=None,
                     strength: float = 1.0) -> np.ndarray:
    """diffusers' float images in [0, 1], (N, H, W, 3), seeded with a CPU generator."""
    kwargs = dict(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                  guidance_scale=guidance, num_images_per_prompt=batch, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(seed))
    if mode == "txt2img":
        kwargs.update(width=width, height=height)
    elif mode == "img2img":
        kwargs.update(image=image.resize((width, height)) if image.size != (width, height) else image,
                      strength=strength)
    else:
        kwargs.update(image=image, mask_image=mask, width=width, height=height, strength=strength)
    with torch.no_grad():
        return np.asarray(pipe(**kwargs).images, dtype=np.float32)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm((actual - expected).ravel()) / max(np.linalg.norm(expected.ravel()), 1e-12))


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    mse = float(np.mean((actual.astype(np.float64) - expected) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _unet_reference(pipe, feeds: dict) -> np.ndarray:
    """diffusers' UNet on the engine's feeds (timestep_cond and SDXL's added_cond_kwargs where present)."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    added = {k: t.pop(k) for k in ("text_embeds", "time_ids") if k in t}
    return pipe.unet(t.pop("sample"), t.pop("timestep"), t.pop("encoder_hidden_states"),
                     added_cond_kwargs=added or None, **t).sample.numpy()


def stage_errors(pipe, sdrt_pipe: Pipeline, width: int, height: int, seed: int) -> dict:
    """Relative L2 of each engine against its torch module on the same random inputs."""
    rng = np.random.default_rng(seed)
    dims = sdrt_pipe.dims
    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    latent = rng.standard_normal((2, dims.latent_channels, height // 8, width // 8), dtype=np.float32)
    pixels = rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    feeds = {t.name: rng.standard_normal(t.shape(2, height, width), dtype=np.float32)
             for t in sdrt_pipe.manifest.specs[UNET].inputs}
    feeds["timestep"] = np.array([981.0, 981.0], dtype=np.float32)
    out = {}
    with torch.no_grad():
        encoders = ((TEXT_ENCODER, "text_embeddings"), (TEXT_ENCODER_2, "text_embeddings_2"))
        for (name, label), tokenizer in zip(encoders, sdrt_pipe.conditioner.tokenizers):
            ids = tokenizer(prompts)
            ref = getattr(pipe, name)(torch.from_numpy(ids).long(), output_hidden_states=True)
            got = sdrt_pipe.engine(name)({"input_ids": ids})
            out[label] = max(
                rel_l2(got[key], (ref.hidden_states[-2] if key == "hidden_states" else ref[key]).numpy())
                for key in got if key != "pooler_output")
        out["unet_step"] = rel_l2(sdrt_pipe.engine(UNET)(feeds)["out_sample"], _unet_reference(pipe, feeds))
        ref = pipe.vae.decode(torch.from_numpy(latent)).sample.numpy()
        out["vae_decode"] = rel_l2(sdrt_pipe.engine(VAE_DECODER)({"latent": latent})["images"], ref)
        if sdrt_pipe.manifest.has(VAE_ENCODER):
            dist = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist
            got = sdrt_pipe.engine(VAE_ENCODER)({"images": pixels})
            out["vae_encode"] = max(rel_l2(got["mean"], dist.mean.numpy()), rel_l2(got["logvar"], dist.logvar.numpy()))
    return out


def _inpaint_inputs(width: int, height: int, seed: int) -> dict:
    """A deterministic picture (gradients and noise) and a mask repainting its middle."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, x * y], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return {"image": Image.fromarray(rgb.astype(np.uint8)), "mask": Image.fromarray(mask)}


def verify(model_dir, engines_dir, *, scheduler=None, steps=4, width=None, height=None, seed=0,
           prompt="a photo of a cat", negative_prompt="", guidance=7.5, controlnet_dirs=None,
           control_images=None, loras=None, backend="ort-cpu") -> dict:
    """Run both pipelines on the same request; return the report (``failed`` past tolerance). ``loras``
    (``["FILE[:WEIGHT]" or (path, weight)]``): sdrt's run-time LoRA vs diffusers' ``load_lora_weights`` + ``fuse_lora``."""
    from sdrt_export import lora as lora_export

    pairs = lora_export.normalize(loras)
    sdrt_pipe = Pipeline(engines_dir, backend=backend)
    precision = sdrt_pipe.manifest.data.get("precision", "fp32")
    if getattr(sdrt_pipe.engine(UNET), "precision", None) == "bf16":  # OpenVINO on an AVX512_BF16 CPU
        precision = "bf16"
    sizes = sdrt_pipe.manifest.sizes
    width, height = width or sizes.min_size, height or sizes.min_size
    dims = sdrt_pipe.dims
    mode = "inpaint" if dims.unet_in_channels != dims.latent_channels else "txt2img"
    inputs = {}
    if mode == "inpaint":
        inputs = {**_inpaint_inputs(width, height, seed), "strength": default_inpaint_strength(dims)}
    request = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed, width=width,
                   height=height, **inputs)
    control = controlnet.verify_inputs(controlnet_dirs, control_images, width, height)  # {} without ControlNets
    result = getattr(sdrt_pipe, mode)(prompt=prompt, scheduler=scheduler, **request, **control,
                                      **({"loras": pairs} if pairs else {}))
    pipe = controlnet.load_reference(model_dir, controlnet_dirs, mode) if control else \
        load_reference(model_dir, mode, scheduler)
    lora_export.fuse_reference(pipe, pairs)
    use_scheduler(pipe, scheduler)
    expected = (controlnet.reference_images if control else reference_images)(pipe, mode, prompt, **request,
                                                                              **control)
    stages = stage_errors(pipe, sdrt_pipe, width, height, seed)
    stages.update(controlnet.stage_errors(pipe, sdrt_pipe, width, height, seed) if control else {})
    max_abs = float(np.abs(result.unit_images - expected).max())
    failed = max_abs > IMAGE_TOLERANCE[precision] or any(v > STAGE_TOLERANCE[precision] for v in stages.values())
    report = {"mode": mode, "scheduler": scheduler or sdrt_pipe.manifest.scheduler_config.get("_class_name"),
              "steps": steps, "backend": backend,
              "size": f"{width}x{height}", "seed": seed, "precision": precision, "stages_rel_l2": stages,
              "image_max_abs": max_abs, "image_psnr_db": psnr(result.unit_images, expected),
              "tolerance_max_abs": IMAGE_TOLERANCE[precision], "failed": failed,
              "loras": [{"path": p, "weight": w} for p, w in pairs]}
    verdict = "FAIL" if failed else "ok"
    stage_text = ", ".join(f"{k} {v:.2e}" for k, v in stages.items())
    report["message"] = (f"verify {verdict} ({mode}): image max abs {max_abs:.2e} "
                         f"(tolerance {IMAGE_TOLERANCE[precision]:.0e}), "
                         f"PSNR {report['image_psnr_db']:.1f} dB; stage rel L2: {stage_text}")
    return report
