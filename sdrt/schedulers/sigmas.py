"""Sigma tables and step-index bookkeeping shared by the k-diffusion style schedulers.

Karras et al. 2022, 'Elucidating the Design Space of Diffusion-Based Generative Models': a sample at
noise level sigma is x0 + sigma * eps. Tables follow diffusers' dtypes: training sigmas in float32,
interpolation and Karras ramps in float64, the final table rounded to float32.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sdrt.errors import InputError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import (check_steps, karras_sigmas, make_alphas_cumprod, per_item,
                                    sigma_to_t, sigmas_from_alphas_cumprod, spaced_timesteps, to_namespace,
                                    torch_linspace)

f32 = np.float32


def float_timesteps(config, n: int) -> np.ndarray:
    """Descending float32 timesteps; 'linspace' is not rounded (diffusers' Euler-family spacing)."""
    if config.timestep_spacing == "linspace":
        check_steps(n, config.num_train_timesteps)
        return np.linspace(0, config.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
    return spaced_timesteps(config, n).astype(np.float32)


def karras(in_sigmas: np.ndarray, n: int, config, use_config_range: bool = False) -> np.ndarray:
    """Karras ramp (float64) between the ends of descending ``in_sigmas`` or the config's sigma_min/max."""
    lo, hi = float(in_sigmas[-1]), float(in_sigmas[0])
    if use_config_range:
        lo = lo if config.sigma_min is None else config.sigma_min
        hi = hi if config.sigma_max is None else config.sigma_max
    return karras_sigmas(lo, hi, n)


def final_sigma(config, train_sigmas: np.ndarray) -> float:
    """The sigma appended after the last step: 0 or the smallest training sigma."""
    if config.final_sigmas_type == "zero":
        return 0.0
    if config.final_sigmas_type == "sigma_min":
        return float(train_sigmas[0])
    raise InputError(f"final_sigmas_type {config.final_sigmas_type!r} is not supported (zero, sigma_min)")


def k_schedule(config, train_sigmas: np.ndarray, n: int, final: float = 0.0, config_range: bool = False,
               log_linear: bool = False):
    """(float timesteps, float32 sigmas + final) as LMS/Euler/Heun ``set_timesteps`` build them."""
    timesteps = float_timesteps(config, n)
    if log_linear:
        ends = np.log(train_sigmas[[-1, 0]])
        sigmas = np.exp(torch_linspace(float(ends[0]), float(ends[1]), n + 1))
    else:
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if config.use_karras_sigmas:
        sigmas = karras(sigmas, n, config, config_range)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
    return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


def noise_sigma(config, sigmas: np.ndarray) -> float:
    """``init_noise_sigma``: the largest sigma, or sqrt(sigma_max^2 + 1) for 'leading' spacing."""
    top = f32(sigmas.max())
    if config.timestep_spacing in ("linspace", "trailing"):
        return float(top)
    return float(np.sqrt(top * top + f32(1)))


def x0_from(config, model_output, sample, sigma):
    """Predicted x0 from a model output at float32 ``sigma`` (Karras et al. 2022, Table 1)."""
    kind = config.prediction_type
    if kind == "epsilon":
        return sample - float(sigma) * model_output
    if kind == "v_prediction":
        c = sigma * sigma + f32(1)
        return model_output * float(-sigma / np.sqrt(c)) + sample / float(c)
    if kind == "sample":
        return model_output
    raise InputError(f"prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


class SigmaScheduler(Scheduler):
    """Base of the sigma-parameterised schedulers: tables, step index, input scaling, noising."""

    has_zero_snr = True  # whether the diffusers class reads rescale_betas_zero_snr

    def __init__(self, config):
        super().__init__(config)
        if not self.has_zero_snr:
            config = replace(config, rescale_betas_zero_snr=False)
        self.alphas_cumprod = make_alphas_cumprod(config)
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = np.zeros(0, dtype=np.float32)
        self._begin_index = None
        self._step_index = None

    def _reset(self) -> None:
        self._begin_index = None
        self._step_index = None

    @property
    def step_index(self):
        return self._step_index

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep``; the second match when it repeats (diffusers' img2img rule)."""
        hits = np.flatnonzero(self.timesteps == float(timestep))
        if len(hits) == 0:
            raise InputError(f"timestep {timestep} is not in this scheduler's timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, timestep) -> int:
        if self._step_index is None:
            if self._begin_index is None:
                self._step_index = self.index_for_timestep(timestep)
            else:
                self._step_index = self._begin_index
        return self._step_index

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1), the input scaling of Karras et al. 2022 (Table 1, c_in)."""
        sigma = f32(self.sigmas[self._init_step_index(timestep)])
        return sample / float(np.sqrt(sigma * sigma + f32(1)))

    def _noise_index(self, timestep) -> int:
        if self._begin_index is None:
            return self.index_for_timestep(timestep)
        return self._step_index if self._step_index is not None else self._begin_index

    def _noise_sigmas(self, timestep) -> np.ndarray:
        """float32 sigma(s) for ``timestep`` (a scalar or one per batch item, host values), 1-D."""
        ts = np.asarray(timestep).reshape(-1)
        return np.array([self.sigmas[self._noise_index(t)] for t in ts], dtype=np.float32)

    def add_noise(self, original_samples, noise, timestep):
        """x0 + sigma * noise at the sigma of ``timestep`` (begin_index's when set, as diffusers);
        ``noise`` (numpy from a generator) is moved into the namespace of ``original_samples``."""
        sigma = per_item(self._noise_sigmas(timestep), original_samples)
        return original_samples + to_namespace(noise, original_samples) * sigma
