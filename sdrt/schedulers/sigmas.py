"""Sigma tables and step-index bookkeeping shared by the k-diffusion style schedulers.

Karras et al. 2022, 'Elucidating the Design Space of Diffusion-Based Generative Models': a sample at
noise level sigma is x0 + sigma * eps. Tables follow diffusers' dtypes: training sigmas in float32,
interpolation and Karras ramps in float64, the final table rounded to float32.
"""

from __future__ import annotations

import math

import numpy as np

from sdrt.errors import InputError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import (check_steps, make_alphas_cumprod, per_item, sigma_to_t,
                                    sigmas_from_alphas_cumprod, spaced_timesteps, to_namespace, torch_linspace)

f32 = np.float32


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, 'Elucidating the Design Space of Diffusion-Based Generative Models', Eq. 5."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas evenly spaced in log sigma (diffusers ``_convert_to_exponential``)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _betainc(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) for x in (0, 1): the continued fraction (Numerical Recipes
    6.4, modified Lentz), on the side of the split point where it converges fast."""
    flip = x > (a + 1) / (a + b + 2)
    x = np.where(flip, 1 - x, x)
    a, b = np.where(flip, b, a), np.where(flip, a, b)

    def fix(v):
        return np.where(np.abs(v) < 1e-300, 1e-300, v)

    c, d = np.ones_like(x), 1 / fix(1 - (a + b) * x / (a + 1))
    h = d.copy()
    for m in range(1, 300):
        num = m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m))
        d, c = 1 / fix(1 + num * d), fix(1 + num / c)
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m))
        d, c = 1 / fix(1 + num * d), fix(1 + num / c)
        h *= d * c
        if np.all(np.abs(d * c - 1) < 1e-15):
            break
    lgamma = np.vectorize(math.lgamma)
    front = np.exp(a * np.log(x) + b * np.log1p(-x) - (lgamma(a) + lgamma(b) - lgamma(a + b))) / a
    return np.where(flip, 1 - front * h, front * h)


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """Quantiles of the Beta(a, b) distribution (``scipy.stats.beta.ppf``), float64: bisection of I_x(a, b),
    then Newton steps on its density."""
    q = np.asarray(q, dtype=np.float64)
    inner = (q > 0) & (q < 1)
    target = np.where(inner, q, 0.5)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(12):
        mid = (lo + hi) / 2
        below = _betainc(mid, a, b) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    x = (lo + hi) / 2
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    for _ in range(100):  # Newton, falling back to bisection where it would leave the bracket
        f = _betainc(x, a, b) - target
        lo, hi = np.where(f < 0, x, lo), np.where(f < 0, hi, x)
        newton = x - f / np.exp(log_norm + (a - 1) * np.log(x) + (b - 1) * np.log1p(-x))
        x, last = np.where((newton >= lo) & (newton <= hi), newton, (lo + hi) / 2), x
        if np.all(np.abs(x - last) <= 1e-12 * x):  # quadratic convergence: x is exact to ~1e-24 now
            break
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, x))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, 'Beta Sampling is All You Need': sigmas at Beta(alpha, beta) quantiles of the range
    (diffusers ``_convert_to_beta``, whose alpha = beta = 0.6 no config key changes)."""
    ppf = beta_ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def ramp_sigmas(config, in_sigmas: np.ndarray, n: int, karras_range: bool = True) -> np.ndarray | None:
    """The Karras / exponential / beta schedule ``config`` selects (float64), between the ends of descending
    ``in_sigmas`` or the config's sigma_min / sigma_max (not for LMS's Karras ramp: ``karras_range``);
    None when it selects none."""
    lo, hi = float(in_sigmas[-1]), float(in_sigmas[0])
    if config.sigma_min is not None and (karras_range or not config.use_karras_sigmas):
        lo = float(config.sigma_min)
    if config.sigma_max is not None and (karras_range or not config.use_karras_sigmas):
        hi = float(config.sigma_max)
    if config.use_karras_sigmas:
        return karras_sigmas(lo, hi, n)
    if config.use_exponential_sigmas:
        return exponential_sigmas(lo, hi, n)
    if config.use_beta_sigmas:
        return beta_sigmas(lo, hi, n)
    return None


def float_timesteps(config, n: int) -> np.ndarray:
    """Descending float32 timesteps; 'linspace' is not rounded (diffusers' Euler-family spacing)."""
    if config.timestep_spacing == "linspace":
        check_steps(n, config.num_train_timesteps)
        return np.linspace(0, config.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
    return spaced_timesteps(config, n).astype(np.float32)


def final_sigma(config, train_sigmas: np.ndarray) -> float:
    """The sigma appended after the last step: 0 or the smallest training sigma."""
    if config.final_sigmas_type == "zero":
        return 0.0
    if config.final_sigmas_type == "sigma_min":
        return float(train_sigmas[0])
    raise InputError(f"final_sigmas_type {config.final_sigmas_type!r} is not supported (zero, sigma_min)")


def k_schedule(config, train_sigmas: np.ndarray, n: int, final: float = 0.0, karras_range: bool = True,
               log_linear: bool = False):
    """(float timesteps, float32 sigmas + final) as LMS/Euler/Heun ``set_timesteps`` build them."""
    timesteps = float_timesteps(config, n)
    if log_linear:
        ends = np.log(train_sigmas[[-1, 0]])
        sigmas = np.exp(torch_linspace(float(ends[0]), float(ends[1]), n + 1))
    else:
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    ramped = ramp_sigmas(config, sigmas, n, karras_range)
    if ramped is not None:
        sigmas = ramped
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

    def __init__(self, config):
        super().__init__(config)
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
