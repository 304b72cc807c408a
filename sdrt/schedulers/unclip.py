"""unCLIP's DDPM variant (Ramesh et al. 2022, 'Hierarchical Text-Conditional Image Generation with CLIP
Latents'; the karlo sampler): diffusers ``UnCLIPScheduler``, the scheduler of the Kandinsky 2.x priors.

It differs from ``DDPMScheduler`` in three ways, all reproduced here: timesteps are
``round(arange(N) * 999 / (N - 1))`` reversed (they end at 0, so N - 1 steps draw noise); beta is recomputed
from the step actually taken (``1 - a_t / a_prev``) unless that step is t -> t - 1; ``learned_range`` mixes
the log variances and exponentiates once more (diffusers' ``(0.5 * variance).exp()``).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import (StepOutput, add_noise_vp, betas_for_alpha_bar, check_steps, namespace,
                                    need_generator, to_namespace, torch_cumprod)

f32 = np.float32
TABLE = "table"  # step()'s default prev_timestep: the next entry of set_timesteps' table (the prior pipeline's)


class UnCLIP(Scheduler):
    """As diffusers ``UnCLIPScheduler``: squaredcos_cap_v2 betas only; ``fixed_small_log`` or ``learned_range``."""

    class_name = "UnCLIPScheduler"
    defaults = {"num_train_timesteps": 1000, "variance_type": "fixed_small_log", "clip_sample": True,
                "clip_sample_range": 1.0, "prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2"}
    keys = frozenset(defaults)
    choices = {"variance_type": ("fixed_small_log", "learned_range"), "prediction_type": ("epsilon", "sample"),
               "beta_schedule": ("squaredcos_cap_v2",)}
    stochastic = True

    def __init__(self, config):
        super().__init__(config)
        self.betas = betas_for_alpha_bar(config.num_train_timesteps)
        self.alphas = (f32(1) - self.betas).astype(f32)
        self.alphas_cumprod = torch_cumprod(self.alphas)
        self.timesteps = np.arange(config.num_train_timesteps)[::-1].copy().astype(np.int64)
        self._next: dict[int, int | None] = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        """``round(arange(N) * (T - 1) / (N - 1))`` reversed; N >= 2 (diffusers divides by N - 1)."""
        check_steps(num_inference_steps, self.config.num_train_timesteps)
        if num_inference_steps < 2:
            raise InputError(f"UnCLIPScheduler needs steps >= 2 (its grid runs from {self.config.num_train_timesteps - 1} "
                             f"to 0), got {num_inference_steps}")
        n = int(num_inference_steps)
        ratio = (self.config.num_train_timesteps - 1) / (n - 1)
        self.timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        self.num_inference_steps = n
        self._begin_index = 0
        ts = [int(t) for t in self.timesteps]
        self._next = dict(zip(ts, ts[1:] + [None]))  # the last step gets None, i.e. t - 1, as the pipeline passes

    def _coefficients(self, t: int, prev: int):
        a_t = f32(self.alphas_cumprod[t])
        a_p = f32(self.alphas_cumprod[prev]) if prev >= 0 else f32(1)
        if prev == t - 1:
            beta, alpha = f32(self.betas[t]), f32(self.alphas[t])
        else:
            beta = f32(1) - a_t / a_p
            alpha = f32(1) - beta
        return a_t, a_p, f32(1) - a_t, f32(1) - a_p, beta, alpha

    def step(self, model_output, timestep, sample, generator=None, prev_timestep=TABLE) -> StepOutput:
        """``prev_timestep``: diffusers' argument (None: t - 1); by default the entry after ``timestep`` in the
        table, which is what ``KandinskyV22PriorPipeline`` passes (``timesteps[i + 1]``, None at the end)."""
        t = int(timestep)
        if isinstance(prev_timestep, str):
            prev_timestep = self._next.get(t)
        prev = t - 1 if prev_timestep is None else int(prev_timestep)
        predicted_variance = None
        channels = sample.shape[1]
        if model_output.shape[1] == 2 * channels and self.config.variance_type == "learned_range":
            model_output, predicted_variance = model_output[:, :channels, ...], model_output[:, channels:, ...]
        a_t, a_p, b_t, b_p, beta, alpha = self._coefficients(t, prev)
        if self.config.prediction_type == "epsilon":
            x0 = (sample - float(np.sqrt(b_t)) * model_output) / float(np.sqrt(a_t))
        else:  # "sample" (config choices refuse anything else)
            x0 = model_output
        if self.config.clip_sample:
            r = float(self.config.clip_sample_range)
            x0 = namespace(x0).clip(x0, -r, r)
        c_x0 = (np.sqrt(a_p) * beta) / b_t
        c_x = np.sqrt(alpha) * b_p / b_t
        prev_sample = float(c_x0) * x0 + float(c_x) * sample
        if t > 0:
            need_generator(generator, "UnCLIPScheduler")
            noise = to_namespace(generator.randn(model_output.shape), sample)
            variance = b_p / b_t * beta
            if self.config.variance_type == "fixed_small_log":
                std = float(np.exp(f32(0.5) * np.log(max(variance, f32(1e-20)))))
            else:  # learned_range: interpolate log variances by the model's v in [-1, 1] (Nichol & Dhariwal 2021)
                xp = namespace(predicted_variance)
                frac = (predicted_variance + 1) / 2
                log_var = frac * float(np.log(beta)) + (1 - frac) * float(np.log(variance))
                std = xp.exp(0.5 * log_var)
            prev_sample = prev_sample + std * noise
        return StepOutput(prev_sample, x0)

    def add_noise(self, original_samples, noise, timestep):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timestep)
