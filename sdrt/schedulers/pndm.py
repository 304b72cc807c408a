"""PNDM / PLMS: Liu et al. 2022, 'Pseudo Numerical Methods for Diffusion Models on Manifolds';
diffusers ``PNDMScheduler``. SD configs set ``skip_prk_steps`` (pure PLMS, 4th-order linear multistep
warmed up with lower orders); otherwise the first 3 steps are pseudo Runge-Kutta (4 evaluations each).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import StepOutput, add_noise_vp, plain_alphas_cumprod, spaced_timesteps
from sdrt.schedulers.config import BASE_KEYS

f32 = np.float32


class PNDM(Scheduler):
    """PLMS (and PRK warmup when ``skip_prk_steps`` is false), as diffusers ``PNDMScheduler``."""

    class_name = "PNDMScheduler"
    defaults = {"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}
    keys = BASE_KEYS | {"skip_prk_steps", "set_alpha_to_one"}
    choices = {"prediction_type": ("epsilon", "v_prediction")}

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = plain_alphas_cumprod(config)
        self.final_alpha_cumprod = f32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self._reset()

    def _reset(self) -> None:
        self.ets: list = []  # the last 4 model outputs (PLMS history)
        self.counter = 0  # steps taken so far
        self.cur_sample = None  # sample held across the PRK stages / the first PLMS pair
        self.cur_model_output = 0  # running PRK weighted sum

    def set_timesteps(self, num_inference_steps: int) -> None:
        n_train, n = self.config.num_train_timesteps, int(num_inference_steps)
        ts = spaced_timesteps(self.config, n)[::-1]  # ascending, as diffusers' _timesteps
        if self.config.skip_prk_steps:
            self.prk_timesteps = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            if n < 4:
                raise InputError("PNDM with PRK steps (skip_prk_steps false) needs at least 4 steps")
            prk = ts[-4:].repeat(2) + np.tile(np.array([0, n_train // n // 2]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].astype(np.int64)
            plms = ts[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.num_inference_steps = n
        self._begin_index = 0
        self._reset()

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_t: sample, e_t: model_output, ets: past e's; prev sample via the PNDM transfer (Eq. 11)
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    def _step_prk(self, e, t: int, x) -> StepOutput:
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t - (0 if self.counter % 2 else half)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * e
            self.ets.append(e)
            self.cur_sample = x
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * e
        else:
            e = self.cur_model_output + 1 / 6 * e
            self.cur_model_output = 0
        cur = self.cur_sample if self.cur_sample is not None else x
        self.counter += 1
        return StepOutput(self._transfer(cur, t, prev_t, e))

    def _step_plms(self, e, t: int, x) -> StepOutput:
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise InputError("PNDM without skip_prk_steps must run its PRK warmup steps first")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:] + [e]
        else:
            prev_t, t = t, t + ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = x
        elif len(ets) == 1 and self.counter == 1:
            e, x, self.cur_sample = (e + ets[-1]) / 2, self.cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        return StepOutput(self._transfer(x, t, prev_t, e))

    def _transfer(self, x, t: int, prev_t: int, e):
        """x_{t-d} from x_t and eps (Liu et al. Eq. 9), float32 scalars as diffusers ``_get_prev_sample``."""
        a_t = f32(self.alphas_cumprod[t])
        a_p = f32(self.alphas_cumprod[prev_t]) if prev_t >= 0 else f32(self.final_alpha_cumprod)
        b_t, b_p = f32(1) - a_t, f32(1) - a_p
        if self.config.prediction_type == "v_prediction":
            e = float(np.sqrt(a_t)) * e + float(np.sqrt(b_t)) * x
        denom = a_t * np.sqrt(b_p) + np.sqrt(a_t * b_t * a_p)
        return float(np.sqrt(a_p / a_t)) * x - float(a_p - a_t) * e / float(denom)

    def add_noise(self, original_samples, noise, timestep):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timestep)
