"""LCM multistep sampling: Luo et al. 2023, 'Latent Consistency Models' (Alg. 3); diffusers ``LCMScheduler``."""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import (StepOutput, add_noise_vp, check_steps, clip_x0, need_generator,
                                    plain_alphas_cumprod, predicted_x0_eps, to_namespace)
from sdrt.schedulers.config import BASE_KEYS, CLIP_KEYS, THRESHOLD_KEYS

f32 = np.float32
SIGMA_DATA = 0.5


class LCM(Scheduler):
    """Consistency-function denoise f(x_t, t) = c_skip x_t + c_out x0, then re-noise to the next t."""

    class_name = "LCMScheduler"
    defaults = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "set_alpha_to_one": True, "timestep_spacing": "leading", "original_inference_steps": 50}
    keys = BASE_KEYS | CLIP_KEYS | THRESHOLD_KEYS | {"original_inference_steps", "set_alpha_to_one", "timestep_scaling",
                                                     "rescale_betas_zero_snr"}
    stochastic = True

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = plain_alphas_cumprod(config)
        self.final_alpha_cumprod = f32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        n_train, original = self.config.num_train_timesteps, self.config.original_inference_steps
        check_steps(num_inference_steps, n_train)
        if not 1 <= original <= n_train:
            raise InputError(f"LCM original_inference_steps {original} must be in [1, {n_train}]")
        if num_inference_steps > original:
            raise InputError(f"LCM steps {num_inference_steps} exceed original_inference_steps {original}")
        origin = (np.arange(1, original + 1) * (n_train // original) - 1)[::-1]  # the distillation grid
        index = np.floor(np.linspace(0, original, num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[index].astype(np.int64)
        self.num_inference_steps = int(num_inference_steps)
        self._begin_index, self._step_index = None, None  # None: found from the first timestep, as diffusers

    def boundary_scalings(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) of the consistency parameterisation (Song et al. 2023), float32 as diffusers."""
        st = f32(t * self.config.timestep_scaling)
        d2 = f32(SIGMA_DATA**2)
        return float(d2 / (st * st + d2)), float(st / np.sqrt(st * st + d2))

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_t: sample, a_t / a_p: alphas_cumprod at t / next t, z ~ N(0, I); x_p = sqrt(a_p) f + sqrt(1-a_p) z
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else \
                int(np.nonzero(self.timesteps == int(timestep))[0][0])
        i, t = self._step_index, int(timestep)
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t = f32(self.alphas_cumprod[t])
        a_p = f32(self.alphas_cumprod[prev]) if prev >= 0 else f32(self.final_alpha_cumprod)
        c_skip, c_out = self.boundary_scalings(t)
        x0, _ = predicted_x0_eps(self.config, model_output, sample, a_t, need_eps=False)
        denoised = c_out * clip_x0(self.config, x0) + c_skip * sample
        if i != self.num_inference_steps - 1:
            need_generator(generator, "LCM")
            noise = to_namespace(generator.randn(model_output.shape), sample)
            prev_sample = float(np.sqrt(a_p)) * denoised + float(np.sqrt(f32(1) - a_p)) * noise
        else:
            prev_sample = denoised
        self._step_index = i + 1
        return StepOutput(prev_sample, denoised)

    def add_noise(self, original_samples, noise, timestep):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timestep)
