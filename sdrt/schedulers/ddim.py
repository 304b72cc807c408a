"""DDIM: Song et al. 2020, 'Denoising Diffusion Implicit Models' (Eq. 12); diffusers ``DDIMScheduler``."""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import (StepOutput, add_noise_vp, clip_x0, need_generator, plain_alphas_cumprod,
                                    predicted_x0_eps, spaced_timesteps, to_namespace)
from sdrt.schedulers.config import BASE_KEYS, CLIP_KEYS, THRESHOLD_KEYS

f32 = np.float32


class DDIM(Scheduler):
    """Deterministic DDIM sampler (eta = 0 by default), as diffusers ``DDIMScheduler``."""

    class_name = "DDIMScheduler"
    defaults = {"clip_sample": True, "set_alpha_to_one": True, "timestep_spacing": "leading"}
    keys = BASE_KEYS | CLIP_KEYS | THRESHOLD_KEYS | {"set_alpha_to_one", "rescale_betas_zero_snr"}

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = plain_alphas_cumprod(config)
        self.final_alpha_cumprod = f32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._begin_index = 0

    def _alpha(self, t: int):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0) -> StepOutput:
        # x_t: sample, eps: model_output, a_t / a_p: alphas_cumprod at t and at the previous (lower) t
        t = int(timestep)
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t, a_p = f32(self._alpha(t)), f32(self._alpha(prev))
        x0, eps = predicted_x0_eps(self.config, model_output, sample, a_t)
        x0 = clip_x0(self.config, x0)
        var = ((f32(1) - a_p) / (f32(1) - a_t)) * (f32(1) - a_t / a_p)
        std = f32(eta) * np.sqrt(var)
        prev_sample = float(np.sqrt(a_p)) * x0 + float(np.sqrt(f32(1) - a_p - std * std)) * eps
        if eta > 0:
            need_generator(generator, "DDIM with eta > 0")
            prev_sample = prev_sample + float(std) * to_namespace(generator.randn(model_output.shape), sample)
        return StepOutput(prev_sample, x0)

    def add_noise(self, original_samples, noise, timestep):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timestep)
