"""``sdrt verify`` for Kandinsky 2.2: sdrt against diffusers' combined pipelines (torch, fp32), same seed.

Per stage: the prior's image embedding (sdrt's whole prior stage against ``KandinskyV22PriorPipeline`` with the
same generator, and the artifact's negative embedding against ``get_zero_embed``), one decoder UNet call and
the MoVQ decode (and encode) on the same random inputs (relative L2); then the final image of
``KandinskyV22CombinedPipeline`` (``KandinskyV22InpaintCombinedPipeline`` for a 9-channel decoder), max abs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdrt.errors import ModelError
from sdrt.pipelines.kandinsky import KandinskyTimings
from sdrt.rng import TorchGenerator
from sdrt.specs_kandinsky import DECODER_UNET, IMAGE_EMBEDS, MOVQ_DECODER, MOVQ_ENCODER, OUT_SAMPLE, SAMPLE, TIMESTEP

DECODERS = {"txt2img": "KandinskyV22Pipeline", "img2img": "KandinskyV22Img2ImgPipeline",
            "inpaint": "KandinskyV22InpaintPipeline"}
COMBINED = {"txt2img": "KandinskyV22CombinedPipeline", "img2img": "KandinskyV22Img2ImgCombinedPipeline",
            "inpaint": "KandinskyV22InpaintCombinedPipeline"}


def model_folders(model_dir, prior_dir=None) -> tuple[Path, Path]:
    """(prior folder, decoder folder): MODEL/prior + MODEL/decoder (``sdrt make-model``), or a decoder folder
    with the prior folder given apart (the two folders the model is published as)."""
    root = Path(model_dir)
    decoder = root / "decoder" if (root / "decoder" / "model_index.json").is_file() else root
    prior = Path(prior_dir) if prior_dir else root / "prior"
    for folder, what in ((prior, "prior"), (decoder, "decoder")):
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"{folder} is not a Kandinsky 2.2 {what} folder (no model_index.json); pass MODEL "
                             "holding prior/ and decoder/, or the decoder folder and --prior PRIOR")
    return prior, decoder


def load_reference(model_dir, mode: str = "txt2img", prior_dir=None, scheduler: str | None = None):
    """diffusers' combined pipeline for ``mode`` built from the two folders, fp32 on the CPU."""
    import diffusers

    from sdrt_export.verify import _quiet_diffusers, use_scheduler

    _quiet_diffusers()
    prior_path, decoder_path = model_folders(model_dir, prior_dir)
    prior = diffusers.KandinskyV22PriorPipeline.from_pretrained(str(prior_path), dtype=torch.float32)
    decoder = getattr(diffusers, DECODERS[mode]).from_pretrained(str(decoder_path), dtype=torch.float32)
    pipe = getattr(diffusers, COMBINED[mode])(
        unet=decoder.unet, scheduler=decoder.scheduler, movq=decoder.movq, prior_prior=prior.prior,
        prior_image_encoder=prior.image_encoder, prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer, prior_scheduler=prior.scheduler, prior_image_processor=prior.image_processor)
    use_scheduler(pipe, scheduler)  # the decoder's (pipe.scheduler); the prior keeps its UnCLIPScheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe, mode: str, prompt: str, *, negative_prompt: str = "", steps: int, guidance: float,
                     prior_steps: int, prior_guidance: float, seed, width: int, height: int, batch: int = 1,
                     image=None, mask=None, strength: float | None = None, generator=None) -> np.ndarray:
    """diffusers' float images in [0, 1], (N, H, W, 3); ``seed`` a CPU generator's seed (or a list: one
    generator per image), unless ``generator`` is given."""
    if generator is None:
        generator = [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, (list, tuple)) \
            else torch.Generator().manual_seed(seed)
    kwargs = dict(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                  guidance_scale=guidance, prior_num_inference_steps=prior_steps,
                  prior_guidance_scale=prior_guidance, num_images_per_prompt=batch, width=width, height=height,
                  output_type="np", generator=generator)
    if mode != "txt2img":
        kwargs["image"] = image
    if mode == "img2img" and strength is not None:
        kwargs["strength"] = strength
    if mode == "inpaint":
        kwargs["mask_image"] = mask
    with torch.no_grad():
        return np.asarray(pipe(**kwargs).images, dtype=np.float32)


def stage_errors(pipe, sdrt_pipe, width: int, height: int, seed: int, prompt: str, prior_steps: int,
                 prior_guidance: float) -> dict:
    """Relative L2 per stage (see the module docstring)."""
    from sdrt_export.verify import rel_l2

    rng = np.random.default_rng(seed)
    dims, s = sdrt_pipe.dims, sdrt_pipe.dims.vae_scale_factor
    out = {}
    with torch.no_grad():
        ref = pipe.prior_pipe(prompt, num_inference_steps=prior_steps, guidance_scale=prior_guidance,
                              generator=torch.Generator().manual_seed(seed), output_type="np")
        embeds, negative = sdrt_pipe.prior(prompt, "", 1, prior_steps, prior_guidance, TorchGenerator(seed),
                                           KandinskyTimings())
        out["prior_image_embeds"] = rel_l2(embeds, ref.image_embeds)
        out["negative_image_embeds"] = rel_l2(negative, ref.negative_image_embeds)
        h, w = height // s, width // s
        feeds = {SAMPLE: rng.standard_normal((2, dims.unet_in_channels, h, w), dtype=np.float32),
                 TIMESTEP: np.array([981.0, 981.0], np.float32),
                 IMAGE_EMBEDS: rng.standard_normal((2, dims.image_embed_dim), dtype=np.float32)}
        got = sdrt_pipe.engine(DECODER_UNET)(feeds)[OUT_SAMPLE]
        expected = pipe.unet(torch.from_numpy(feeds[SAMPLE]), torch.from_numpy(feeds[TIMESTEP]),
                             encoder_hidden_states=None,
                             added_cond_kwargs={"image_embeds": torch.from_numpy(feeds[IMAGE_EMBEDS])}).sample
        out["unet_step"] = rel_l2(got, expected.numpy())
        latent = rng.standard_normal((2, dims.latent_channels, h, w), dtype=np.float32)
        expected = pipe.movq.decode(torch.from_numpy(latent), force_not_quantize=True).sample.numpy()
        out["movq_decode"] = rel_l2(sdrt_pipe.engine(MOVQ_DECODER)({"latent": latent})["images"], expected)
        if sdrt_pipe.manifest.has(MOVQ_ENCODER):
            pixels = rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
            expected = pipe.movq.encode(torch.from_numpy(pixels)).latents.numpy()
            out["movq_encode"] = rel_l2(sdrt_pipe.engine(MOVQ_ENCODER)({"images": pixels})["latents"], expected)
    return out


def verify(model_dir, engines_dir, *, scheduler=None, steps=4, width=None, height=None, seed=0,
           prompt="a photo of a cat", negative_prompt="", guidance=4.0, prior_steps=4, prior_guidance=4.0,
           prior_dir=None) -> dict:
    """Both pipelines on one request (txt2img; inpaint for a 9-channel decoder); ``failed`` past tolerance."""
    from sdrt.pipeline import Pipeline
    from sdrt_export.verify import IMAGE_TOLERANCE, STAGE_TOLERANCE, _inpaint_inputs, psnr

    sdrt_pipe = Pipeline(engines_dir)
    precision = sdrt_pipe.manifest.data.get("precision", "fp32")
    sizes, dims = sdrt_pipe.manifest.sizes, sdrt_pipe.dims
    unit = dims.vae_scale_factor ** 2  # inpainting sizes must be multiples of it; txt2img rounds up to it
    width = width or max(unit, sizes.min_size - sizes.min_size % unit)
    height = height or max(unit, sizes.min_size - sizes.min_size % unit)
    mode = "inpaint" if dims.unet_in_channels != dims.latent_channels else "txt2img"
    inputs = _inpaint_inputs(width, height, seed) if mode == "inpaint" else {}
    request = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, prior_steps=prior_steps,
                   prior_guidance=prior_guidance, seed=seed, width=width, height=height, **inputs)
    result = getattr(sdrt_pipe, mode)(prompt=prompt, scheduler=scheduler, **request)
    pipe = load_reference(model_dir, mode, prior_dir, scheduler)
    expected = reference_images(pipe, mode, prompt, **request)
    stages = stage_errors(pipe, sdrt_pipe, width, height, seed, prompt, prior_steps, prior_guidance)
    max_abs = float(np.abs(result.unit_images - expected).max()) if result.unit_images.shape == expected.shape \
        else float("inf")
    failed = max_abs > IMAGE_TOLERANCE[precision] or any(v > STAGE_TOLERANCE[precision] for v in stages.values())
    report = {"mode": mode, "family": dims.family,
              "scheduler": scheduler or sdrt_pipe.manifest.scheduler_config.get("_class_name"), "steps": steps,
              "prior_steps": prior_steps, "size": f"{result.unit_images.shape[2]}x{result.unit_images.shape[1]}",
              "seed": seed, "precision": precision, "stages_rel_l2": stages, "image_max_abs": max_abs,
              "image_psnr_db": psnr(result.unit_images, expected) if max_abs != float("inf") else 0.0,
              "tolerance_max_abs": IMAGE_TOLERANCE[precision], "failed": failed}
    stage_text = ", ".join(f"{k} {v:.2e}" for k, v in stages.items())
    report["message"] = (f"verify {'FAIL' if failed else 'ok'} (kandinsky22 {mode}): image max abs {max_abs:.2e} "
                         f"(tolerance {IMAGE_TOLERANCE[precision]:.0e}), PSNR {report['image_psnr_db']:.1f} dB; "
                         f"stage rel L2: {stage_text}")
    return report


def is_kandinsky_artifact(engines_dir) -> bool:
    try:
        data = json.loads((Path(engines_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("dims"), dict) and data["dims"].get("family") == "kandinsky22"
