"""Euler: Algorithm 2 of Karras et al. 2022 without churn; diffusers ``EulerDiscreteScheduler``."""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.common import StepOutput, astype, namespace
from sdrt.schedulers.config import BASE_KEYS, RAMP_KEYS
from sdrt.schedulers.sigmas import SigmaScheduler, f32, final_sigma, k_schedule, noise_sigma, x0_from


class Euler(SigmaScheduler):
    """First-order ODE solver on the sigma schedule (Karras et al. 2022, 'Elucidating the Design
    Space of Diffusion-Based Generative Models'), as diffusers ``EulerDiscreteScheduler``."""

    class_name = "EulerDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace"}
    keys = BASE_KEYS | RAMP_KEYS | {"interpolation_type", "timestep_type", "rescale_betas_zero_snr", "final_sigmas_type"}

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        timesteps, self.sigmas = k_schedule(cfg, self.train_sigmas, num_inference_steps,
                                            final_sigma(cfg, self.train_sigmas),
                                            log_linear=cfg.interpolation_type == "log_linear")
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            timesteps = f32(0.25) * np.log(self.sigmas[:-1])
        self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = int(num_inference_steps)
        self.init_noise_sigma = noise_sigma(cfg, self.sigmas)
        self._reset()

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * d_i,  d_i = (x_i - x0_i) / sigma_i
        i = self._init_step_index(timestep)
        sigma, sigma_next = f32(self.sigmas[i]), f32(self.sigmas[i + 1])
        sample = astype(sample, namespace(sample).float32)
        x0 = x0_from(self.config, model_output, sample, sigma)
        derivative = (sample - x0) / float(sigma)
        prev_sample = sample + derivative * float(sigma_next - sigma)
        self._step_index = i + 1
        return StepOutput(astype(prev_sample, model_output.dtype), x0)
