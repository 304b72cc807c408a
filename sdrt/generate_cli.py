"""``sdrt txt2img | img2img | inpaint``: run the pipeline, show a progress bar (terminal only), save PNGs with
their parameters."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from sdrt.controlnet import cli_request as control_request
from sdrt.errors import InputError
from sdrt.images import a1111_parameters, check_same_size, load_image, save_png
from sdrt.lora import cli_request, infotext as lora_infotext
from sdrt.pipeline import Pipeline
from sdrt.progress import progress_bar

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
        if args.strength is not None:  # else the pipeline's default (diffusers': it differs per family)
            extra["strength"] = args.strength
    if args.mode == "inpaint":
        extra["mask"] = load_image(args.mask, "mask")
        check_same_size(extra["image"], extra["mask"])
    extra.update(cli_request(args))  # --lora FILE[:WEIGHT], --lora-dir DIR (bad weights and files fail here)
    extra.update(control_request(args))  # --control-image IMG ..., --control-scale, --control-start/-end, --guess-mode
    pipe = Pipeline(args.engines, backend=args.backend, threads=args.threads)
    with contextlib.ExitStack() as stack:
        bars = []  # opened at the first step, so a request refused up front prints only its error line

        def on_step(i, total, t, latents):
            if not bars:
                bars.append(stack.enter_context(progress_bar(total=total, desc=args.mode, unit="step",
                                                             enabled=not args.json)))
            bars[0].update(1)

        result = getattr(pipe, args.mode)(
            prompt=args.prompt, negative_prompt=args.negative_prompt, **request_options(args, pipe),
            seed=args.seed, width=args.width, height=args.height, scheduler=args.scheduler, batch=args.batch,
            callback=on_step, vae=getattr(args, "vae", "full"), rng=getattr(args, "rng", "cpu"), **extra)
    p = result.parameters
    sampler = args.scheduler or p["scheduler"]
    prompt, lora_fields = lora_infotext(p["prompt"], p)
    text = a1111_parameters(prompt, p["negative_prompt"], p["steps"], sampler, p["guidance"], p["seed"],
                            p["width"], p["height"], **({"Denoising strength": p["strength"]}
                                                        if args.mode != "txt2img" else {}), **rng_infotext(p["rng"]),
                            **lora_fields, **prior_infotext(p))
    saved = [str(save_png(image, path, text)) for image, path in zip(result.images, paths)]
    timings = {"load": pipe.load_seconds, **result.timings, "total": time.perf_counter() - start}
    summary = {"images": saved, "seed": result.seed, "timings_s": timings, "parameters": p}
    summary["message"] = f"saved {', '.join(saved)} (seed {result.seed})\n" + format_timings(timings)
    return summary


def request_options(args, pipe) -> dict:
    """--steps / --guidance when given, else the family pipeline's defaults (diffusers': 30 / 7.5, Kandinsky
    2.2's decoder 100 / 4.0); --prior-steps / --prior-guidance for pipelines with a prior (Kandinsky 2.2)."""
    out = {k: getattr(args, k) for k in ("steps", "guidance") if getattr(args, k, None) is not None}
    prior = {k: getattr(args, k) for k in ("prior_steps", "prior_guidance") if getattr(args, k, None) is not None}
    if prior and not getattr(pipe, "has_prior", False):
        flag = "--" + next(iter(prior)).replace("_", "-")
        raise InputError(f"{flag} applies to Kandinsky 2.2 artifacts only; this one is {pipe.dims.family}")
    return {**out, **prior}


def rng_infotext(rng: str) -> dict:
    """A1111's ``RNG`` field: ``CPU`` for torch's CPU generator, ``NV`` for its CUDA generator (``--rng
    cuda[:GPU]``). Always written: A1111 reads a missing ``RNG`` as its GPU default."""
    return {"RNG": "CPU"} if rng == "cpu" else {"RNG": "NV", "sdrt RNG": rng}


def prior_infotext(p: dict) -> dict:
    """Kandinsky 2.2's prior settings in the PNG text (nothing for families without a prior)."""
    if "prior_steps" not in p:
        return {}
    return {"Prior steps": p["prior_steps"], "Prior CFG scale": p["prior_guidance"]}


def format_timings(timings: dict) -> str:
    """One line per stage: seconds, and count/mean for stages timed once per step."""
    lines = []
    for stage, value in timings.items():
        if isinstance(value, list):
            lines.append(f"  {stage:<14} {sum(value) * 1e3:9.1f} ms  ({len(value)} calls, "
                         f"mean {sum(value) / len(value) * 1e3:.1f} ms)")
        else:
            lines.append(f"  {stage:<14} {value * 1e3:9.1f} ms")
    return "\n".join(lines)
