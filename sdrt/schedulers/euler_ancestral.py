"""Euler ancestral: Euler step to sigma_down plus fresh noise of size sigma_up (Katherine Crowson's
k-diffusion ``sample_euler_ancestral``; Karras et al. 2022); diffusers ``EulerAncestralDiscreteScheduler``."""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.common import StepOutput, astype, namespace, need_generator, to_namespace
from sdrt.schedulers.config import BASE_KEYS
from sdrt.schedulers.sigmas import SigmaScheduler, f32, k_schedule, noise_sigma, x0_from


class EulerAncestral(SigmaScheduler):
    """Stochastic (ancestral) Euler sampler, as diffusers ``EulerAncestralDiscreteScheduler``."""

    class_name = "EulerAncestralDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace"}
    keys = BASE_KEYS | {"rescale_betas_zero_snr"}
    choices = {"prediction_type": ("epsilon", "v_prediction")}  # diffusers raises on 'sample' at the first step
    stochastic = True

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        timesteps, self.sigmas = k_schedule(cfg, self.train_sigmas, num_inference_steps)
        self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = int(num_inference_steps)
        self.init_noise_sigma = noise_sigma(cfg, self.sigmas)
        self._reset()

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_{i+1} = x_i + (sigma_down - sigma_i) d_i + sigma_up z,  sigma_up^2 + sigma_down^2 = sigma_{i+1}^2
        need_generator(generator, "Euler ancestral")
        i = self._init_step_index(timestep)
        s_from, s_to = f32(self.sigmas[i]), f32(self.sigmas[i + 1])
        sigma_up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        sigma_down = np.sqrt(s_to * s_to - sigma_up * sigma_up)
        sample = astype(sample, namespace(sample).float32)
        x0 = x0_from(self.config, model_output, sample, s_from)
        derivative = (sample - x0) / float(s_from)
        prev_sample = sample + derivative * float(sigma_down - s_from)
        prev_sample = prev_sample + to_namespace(generator.randn(model_output.shape), sample) * float(sigma_up)
        self._step_index = i + 1
        return StepOutput(astype(prev_sample, model_output.dtype), x0)
