"""``sdrt txt2img | img2img | inpaint``: run the pipeline, show a tqdm bar, save PNGs with parameters."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from sdrt.errors import InputError
from sdrt.images import a1111_parameters, load_image, save_png
from sdrt.pipeline import Pipeline

log = logging.getLogger(__name__)


def output_paths(out: str, count: int) -> list[Path]:
    """OUT.png for one image; OUT-1.png, OUT-2.png, ... for several."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise InputError(f"--out must name a .png file, got {out}")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def run(args) -> dict:
    start = time.perf_counter()
    paths = output_paths(args.out, args.batch if args.batch >= 1 else 1)
    extra = {}
    if args.mode != "txt2img":
        extra["image"] = load_image(args.image, "image")
        extra["strength"] = args.strength
    if args.mode == "inpaint":
        extra["mask"] = load_image(args.mask, "mask")
    pipe = Pipeline(args.engines, threads=args.threads)
    bar = tqdm(total=None, desc=args.mode, unit="step", disable=args.json, leave=False)

    def on_step(i, total, t, latents):
        bar.total = total
        bar.update(1)

    try:
        result = getattr(pipe, args.mode)(
            prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
            seed=args.seed, width=args.width, height=args.height, scheduler=args.scheduler, batch=args.batch,
            callback=on_step, **extra)
    finally:
        bar.close()
    p = result.parameters
    sampler = args.scheduler or p["scheduler"]
    text = a1111_parameters(p["prompt"], p["negative_prompt"], p["steps"], sampler, p["guidance"], p["seed"],
                            p["width"], p["height"], **({"Denoising strength": p["strength"]}
                                                        if args.mode != "txt2img" else {}))
    saved = [str(save_png(image, path, text)) for image, path in zip(result.images, paths)]
    timings = {"load": pipe.load_seconds, **result.timings, "total": time.perf_counter() - start}
    summary = {"images": saved, "seed": result.seed, "timings_s": timings, "parameters": p}
    unet = timings.get("unet", [])
    unet = unet if isinstance(unet, list) else [unet]
    summary["message"] = (f"saved {', '.join(saved)} (seed {result.seed}); {len(unet)} UNet calls "
                          f"{sum(unet):.2f} s, VAE decode {timings['vae_decode']:.2f} s, total {timings['total']:.2f} s")
    return summary
