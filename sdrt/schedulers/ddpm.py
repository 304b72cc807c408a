"""DDPM ancestral sampling: Ho et al. 2020, 'Denoising Diffusion Probabilistic Models' (Eq. 6-7);
diffusers ``DDPMScheduler`` on a spaced timestep grid."""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import (StepOutput, add_noise_vp, clip_x0, need_generator, plain_alphas_cumprod,
                                    predicted_x0_eps, spaced_timesteps, to_namespace)
from sdrt.schedulers.config import BASE_KEYS, CLIP_KEYS, THRESHOLD_KEYS

f32 = np.float32
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class DDPM(Scheduler):
    """Posterior-mean step plus sigma_t z, z ~ N(0, I) drawn from the generator, as diffusers."""

    class_name = "DDPMScheduler"
    defaults = {"clip_sample": True, "timestep_spacing": "leading", "variance_type": "fixed_small"}
    keys = BASE_KEYS | CLIP_KEYS | THRESHOLD_KEYS | {"variance_type", "rescale_betas_zero_snr"}
    choices = {"variance_type": VARIANCE_TYPES}  # not 'learned' / 'learned_range' (a UNet predicting its variance)
    stochastic = True

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = plain_alphas_cumprod(config)
        self._prev = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._begin_index = 0
        ts = [int(t) for t in self.timesteps]
        self._prev = {}
        for t, p in zip(ts, ts[1:] + [-1]):
            self._prev.setdefault(t, p)  # the entry after t's first occurrence, -1 at the end

    def std(self, t: int) -> float:
        """Standard deviation of the noise added at step t (0 at t = 0), float32 as diffusers ``_get_variance``."""
        a_t = f32(self.alphas_cumprod[t])
        prev = self._prev[t]
        a_p = f32(self.alphas_cumprod[prev]) if prev >= 0 else f32(1)
        beta = f32(1) - a_t / a_p
        small = max((f32(1) - a_p) / (f32(1) - a_t) * beta, f32(1e-20))
        kind = self.config.variance_type
        if kind == "fixed_small":
            return float(np.sqrt(small))
        if kind == "fixed_small_log":
            return float(np.exp(f32(0.5) * np.log(small)))
        if kind == "fixed_large":
            return float(np.sqrt(beta))
        return float(np.exp(f32(0.5) * np.log(beta)))  # fixed_large_log (diffusers yields NaN here: sqrt of a log)

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_t: sample, a_t / a_p: alphas_cumprod at t / previous t, b = 1 - a, beta_t = 1 - a_t / a_p
        t = int(timestep)
        prev = self._prev[t]
        a_t = f32(self.alphas_cumprod[t])
        a_p = f32(self.alphas_cumprod[prev]) if prev >= 0 else f32(1)
        b_t, b_p = f32(1) - a_t, f32(1) - a_p
        alpha, beta = a_t / a_p, f32(1) - a_t / a_p
        x0, _ = predicted_x0_eps(self.config, model_output, sample, a_t, need_eps=False)
        x0 = clip_x0(self.config, x0)
        c_x0, c_x = (np.sqrt(a_p) * beta) / b_t, np.sqrt(alpha) * b_p / b_t
        prev_sample = float(c_x0) * x0 + float(c_x) * sample
        if t > 0:
            need_generator(generator, "DDPM")
            prev_sample = prev_sample + self.std(t) * to_namespace(generator.randn(model_output.shape), sample)
        return StepOutput(prev_sample, x0)

    def add_noise(self, original_samples, noise, timestep):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timestep)
