"""Heun: Algorithm 1 of Karras et al. 2022 (2nd-order Heun ODE steps); diffusers ``HeunDiscreteScheduler``."""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.common import StepOutput, namespace
from sdrt.schedulers.config import BASE_KEYS, CLIP_KEYS, RAMP_KEYS
from sdrt.schedulers.sigmas import SigmaScheduler, f32, k_schedule, noise_sigma, x0_from


class Heun(SigmaScheduler):
    """Heun's method on the sigma ODE (Karras et al. 2022, 'Elucidating the Design Space of
    Diffusion-Based Generative Models'), as diffusers ``HeunDiscreteScheduler``: every step but the
    first is taken twice (Euler predictor, then trapezoidal corrector), so timesteps repeat."""

    class_name = "HeunDiscreteScheduler"
    defaults = {"beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "linspace"}
    keys = BASE_KEYS | RAMP_KEYS | CLIP_KEYS
    order = 2

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps, sigmas = k_schedule(self.config, self.train_sigmas, num_inference_steps)
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]).astype(np.float32)
        self.num_inference_steps = int(num_inference_steps)
        self.init_noise_sigma = noise_sigma(self.config, self.sigmas)
        self._first = None  # (derivative, dt, sample) of the pending Euler predictor
        self._reset()

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # predictor: x' = x_i + (s_{i+1} - s_i) d_i;  corrector: x_{i+1} = x_i + (s_{i+1} - s_i) (d_i + d'_{i+1}) / 2
        i = self._init_step_index(timestep)
        if self._first is None:
            sigma, sigma_next = f32(self.sigmas[i]), f32(self.sigmas[i + 1])
            x0 = self._clip(x0_from(self.config, model_output, sample, sigma))
            derivative = (sample - x0) / float(sigma)
            dt = float(sigma_next - sigma)
            self._first = (derivative, dt, sample)
        else:
            sigma_next = f32(self.sigmas[i])
            x0 = self._clip(x0_from(self.config, model_output, sample, sigma_next))
            derivative = (sample - x0) / float(sigma_next)
            first_derivative, dt, sample = self._first
            derivative = (first_derivative + derivative) / 2
            self._first = None
        prev_sample = sample + derivative * dt
        self._step_index = i + 1
        return StepOutput(prev_sample, x0)

    def _clip(self, x0):
        if self.config.clip_sample:
            r = float(self.config.clip_sample_range)
            return namespace(x0).clip(x0, -r, r)
        return x0
