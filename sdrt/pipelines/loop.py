"""The one denoising loop every family runs: scale, predict, step, guard, report.

``predict(i, t, model_input)`` is the family's model call (UNet feeds, CFG, variance channels); the loop
knows nothing of it, so Stable Diffusion's UNet, Kandinsky's decoder and its prior share this code.
"""

from __future__ import annotations

from typing import Callable

from sdrt.arrays import StepGuard
from sdrt.errors import Cancelled


def denoise(xp, latents, sched, timesteps, generator, predict: Callable, timings, callback=None,
            after_step: Callable | None = None, stage: str = "latents"):
    """Run ``sched`` over ``timesteps`` from ``latents`` (in ``xp``); returns the final latents.

    ``after_step(i, latents) -> latents`` runs after each scheduler step (inpainting's blend);
    ``callback(i, total, t, latents) is False`` cancels with ``Cancelled``."""
    total = len(timesteps)
    guard = StepGuard(xp, total, stage)
    for i, t in enumerate(timesteps):
        with timings("step"):
            noise_pred = predict(i, t, sched.scale_model_input(latents, t))
            latents = sched.step(noise_pred, t, latents, generator=generator).prev_sample
            if after_step is not None:
                latents = after_step(i, latents)
            guard(latents, i + 1)
        if callback is not None and callback(i, total, float(t), latents) is False:
            raise Cancelled(f"cancelled by the step callback at step {i + 1}/{total}")
    guard.finish()
    return latents
