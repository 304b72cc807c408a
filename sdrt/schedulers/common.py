"""Math shared by every scheduler: beta schedules, timestep spacings, sigma tables, noising.

Tables are numpy, computed once in ``set_timesteps``; ``step``, ``scale_model_input`` and ``add_noise``
take their per-step scalars from them as Python floats and do array math with operators and the
sample's own Array-API namespace (``namespace``), so they run unchanged on numpy, cupy or
array_api_strict arrays. Precision follows diffusers: betas and alphas_cumprod are float32, like its
torch tensors.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import numpy as np

from sdrt.errors import InputError
from sdrt.schedulers.config import SchedulerConfig


class StepOutput(NamedTuple):
    prev_sample: object
    pred_original_sample: object = None


def namespace(x):
    """The Array-API namespace of array ``x`` (``x.__array_namespace__()``); for array types without
    one (numpy < 2, older cupy) the top-level module of its class, which has the same functions."""
    get = getattr(x, "__array_namespace__", None)
    if get is not None:
        return get()
    return sys.modules[type(x).__module__.split(".")[0]]


def to_namespace(array, like):
    """``array`` (e.g. numpy noise from a generator) as an array of ``like``'s namespace. For a cupy
    ``like`` that is a host-to-device copy of ``array`` only; a no-op when the namespaces match."""
    return namespace(like).asarray(array)


def astype(x, dtype):
    """``x`` as ``dtype`` (a dtype of ``x``'s namespace), without a copy when it already is one."""
    if x.dtype == dtype:
        return x
    xp = namespace(x)
    return xp.astype(x, dtype) if hasattr(xp, "astype") else x.astype(dtype)


def per_item(values: np.ndarray, like):
    """Per-batch-item coefficients shaped to broadcast against ``like`` in its namespace; one value
    becomes a Python float."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(values) == 1:
        return float(values[0])
    return to_namespace(values.reshape((-1,) + (1,) * (like.ndim - 1)), like)


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace computed like ``torch.linspace`` on the CPU (halves from each end)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)  # torch rounds start + step * i once (an FMA): float64 here
    front = np.float64(start32) + step * i
    back = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, front, back).astype(np.float32)


def torch_cumprod(x: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as ``torch.cumprod`` does on the CPU."""
    return np.cumprod(np.asarray(x, dtype=np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021), as diffusers' ``betas_for_alpha_bar``."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return np.array(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps are Flawed', Alg. 1."""
    alphas_bar_sqrt = np.sqrt(torch_cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # torch's in-place order
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def make_betas(config: SchedulerConfig) -> np.ndarray:
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = torch_linspace(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = torch_linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise InputError(
            f"beta_schedule {config.beta_schedule!r} is not supported "
            "(linear, scaled_linear, squaredcos_cap_v2)"
        )
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def make_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """float32 cumulative product of (1 - beta), like diffusers' ``torch.cumprod``."""
    alphas_cumprod = torch_cumprod(1.0 - make_betas(config))
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = np.float32(2**-24)  # diffusers avoids an infinite sigma this way
    return alphas_cumprod


def spaced_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """Descending int64 timesteps for a spacing ('leading', 'trailing', 'linspace').

    Table 2 of Lin et al. 2023; matches diffusers' DDIM/Euler/DPM ``set_timesteps``.
    """
    check_steps(num_inference_steps, config.num_train_timesteps)
    n_train, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, n_train - 1, n).round()[::-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = n_train // n
        steps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        steps += config.steps_offset
    elif config.timestep_spacing == "trailing":
        ratio = n_train / n
        steps = np.round(np.arange(n_train, 0, -ratio)).astype(np.int64)
        steps -= 1
    else:
        raise InputError(
            f"timestep_spacing {config.timestep_spacing!r} is not supported (leading, trailing, linspace)"
        )
    return steps


def check_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps > num_train_timesteps:
        raise InputError(
            f"steps {num_inference_steps} exceeds the model's {num_train_timesteps} training timesteps"
        )


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas, sigma_t = sqrt((1 - a_t) / a_t) (Karras et al. 2022, Eq. 1)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma by interpolation in log-sigma (diffusers ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def img2img_start(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """Index into ``timesteps`` where img2img starts (diffusers' ``get_timesteps``)."""
    if not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0) * order


def plain_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """float32 cumprod of (1 - beta) without the zero-SNR 2**-24 patch (DDIM, DDPM, PNDM, LCM keep a 0)."""
    return torch_cumprod(1.0 - make_betas(config))


def add_noise_vp(alphas_cumprod: np.ndarray, original_samples, noise, timestep):
    """sqrt(a_t) x0 + sqrt(1 - a_t) noise with float32 coefficients (diffusers DDPM-family ``add_noise``)."""
    a_t = np.float32(alphas_cumprod[int(timestep)])
    noise = to_namespace(noise, original_samples)
    return float(np.sqrt(a_t)) * original_samples + float(np.sqrt(np.float32(1) - a_t)) * noise


def quantile_rows(x, q: float):
    """Per-row ``q``-quantile of 2-D ``x`` with linear interpolation (numpy's / torch's default method),
    by sort and index arithmetic in ``x``'s namespace (the Array API has no quantile)."""
    xp, n = namespace(x), x.shape[1]
    pos = q * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi, frac = min(lo + 1, n - 1), pos - lo
    ordered = xp.sort(x, axis=1)
    below, above = ordered[:, lo], ordered[:, hi]
    if frac < 0.5:  # the two-sided lerp numpy and torch use: exact at both ends
        return below + (above - below) * frac
    return above - (above - below) * (1 - frac)


def threshold_sample(x0, ratio: float, max_value: float):
    """Dynamic thresholding (Saharia et al. 2022, Imagen), per batch item, as diffusers ``_threshold_sample``."""
    xp = namespace(x0)
    flat = xp.reshape(x0, (x0.shape[0], -1))
    s = xp.clip(quantile_rows(xp.abs(flat), ratio), 1.0, float(max_value))[:, None]
    return xp.reshape(xp.clip(flat, -s, s) / s, x0.shape)


def need_generator(generator, name: str) -> None:
    if generator is None:
        raise InputError(f"{name} draws noise at every step: pass a generator (seed) to step()")


def predicted_x0_eps(config: SchedulerConfig, model_output, sample, alpha_cumprod: float, need_eps: bool = True):
    """(x0, eps) from a model output under ``prediction_type`` (epsilon | sample | v_prediction), using
    float32 sqrt(a_t), sqrt(1 - a_t) like diffusers' DDIM/DDPM/LCM; eps is None unless ``need_eps``."""
    a_t = np.float32(alpha_cumprod)
    sa, sb = float(np.sqrt(a_t)), float(np.sqrt(np.float32(1) - a_t))
    kind = config.prediction_type
    if kind == "epsilon":
        return (sample - sb * model_output) / sa, model_output
    if kind == "sample":
        return model_output, ((sample - sa * model_output) / sb if need_eps else None)
    if kind == "v_prediction":
        return sa * sample - sb * model_output, (sa * model_output + sb * sample if need_eps else None)
    raise InputError(f"prediction_type {kind!r} is not supported (epsilon, sample, v_prediction)")


def clip_x0(config: SchedulerConfig, x0):
    """diffusers' dynamic thresholding, else ``clip_sample`` to +-clip_sample_range, of a predicted x0."""
    if config.thresholding:
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return namespace(x0).clip(x0, -float(config.clip_sample_range), float(config.clip_sample_range))
    return x0
