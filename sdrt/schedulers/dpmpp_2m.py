"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022, 'DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models', Alg. 2; 'DPM-Solver', NeurIPS 2022); diffusers ``DPMSolverMultistepScheduler``."""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError, SchedulerConfigError
from sdrt.schedulers.common import (StepOutput, astype, check_steps, namespace, need_generator, per_item, sigma_to_t,
                                    threshold_sample, to_namespace)
from sdrt.schedulers.config import BASE_KEYS, FLOW_INERT, FLOW_REFUSED, RAMP_KEYS, THRESHOLD_KEYS
from sdrt.schedulers.sigmas import SigmaScheduler, f32, final_sigma, ramp_sigmas

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


def lu_lambdas(log_sigmas: np.ndarray, n: int) -> np.ndarray:
    """log sigma (= -lambda) evenly spaced between the ends of descending ``log_sigmas``: uniform log-SNR steps
    (Lu et al. 2022, 'DPM-Solver', Sec. 3.3; diffusers ``_convert_to_lu``), float64."""
    lo, hi = float(log_sigmas[-1]), float(log_sigmas[0])
    return hi + np.linspace(0, 1, n) * (lo - hi)


def dpm_timesteps(config, n: int, last: int) -> np.ndarray:
    """diffusers' DPM-Solver spacing: linspace/leading take n + 1 points and drop the one at t = 0."""
    check_steps(n, config.num_train_timesteps)
    if config.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.arange(last, 0, -config.num_train_timesteps / n).round().astype(np.int64) - 1
    raise InputError(f"timestep_spacing {config.timestep_spacing!r} is not supported (leading, trailing, linspace)")


class DPMSolverMultistep(SigmaScheduler):
    """Multistep DPM-Solver(++) of order 1-3 in log-SNR time, as diffusers ``DPMSolverMultistepScheduler``."""

    class_name = "DPMSolverMultistepScheduler"
    defaults = {"timestep_spacing": "linspace", "variance_type": None}
    keys = BASE_KEYS | THRESHOLD_KEYS | RAMP_KEYS | {
        "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_lu_lambdas",
        "final_sigmas_type", "lambda_min_clipped", "variance_type", "rescale_betas_zero_snr"}
    refused = FLOW_REFUSED
    inert = FLOW_INERT
    # variance_type 'learned' / 'learned_range' (a UNet predicting its variance) is not implemented
    choices = {"algorithm_type": ALGORITHMS, "solver_type": ("midpoint", "heun"), "solver_order": (1, 2, 3),
               "variance_type": (None,)}
    renames = {"solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}}  # as diffusers' __init__

    def __init__(self, config):
        super().__init__(config)
        if config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and config.final_sigmas_type == "zero":
            raise SchedulerConfigError(
                f"{self.class_name}: final_sigmas_type 'zero' needs algorithm_type dpmsolver++ or sde-dpmsolver++, "
                f"not {config.algorithm_type!r}; use final_sigmas_type 'sigma_min'")
        if config.algorithm_type == "sde-dpmsolver" and config.solver_order == 3:
            raise SchedulerConfigError(f"{self.class_name}: sde-dpmsolver has no third-order update (diffusers neither)")
        self.stochastic = config.algorithm_type.startswith("sde")
        a = self.alphas_cumprod
        self.lambda_t = np.log(np.sqrt(a)) - np.log(np.sqrt(1 - a))

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        clipped = int(np.searchsorted(self.lambda_t[::-1], cfg.lambda_min_clipped))
        timesteps = dpm_timesteps(cfg, num_inference_steps, cfg.num_train_timesteps - clipped)
        sigmas, log_sigmas = self.train_sigmas, np.log(self.train_sigmas)
        if cfg.use_lu_lambdas and not cfg.use_karras_sigmas:  # diffusers' precedence: Karras, Lu, exponential, beta
            sigmas = np.exp(lu_lambdas(log_sigmas[::-1], num_inference_steps))
        else:
            sigmas = ramp_sigmas(cfg, sigmas[::-1], num_inference_steps)
        if sigmas is None:
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        else:
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if (cfg.use_karras_sigmas or cfg.use_lu_lambdas) and cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()  # exponential / beta timesteps are truncated below, as diffusers
        self.sigmas = np.concatenate([sigmas, [final_sigma(cfg, self.train_sigmas)]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda = +inf, as in diffusers
            self.alpha_s = f32(1) / np.sqrt(self.sigmas * self.sigmas + f32(1))
            self.sigma_s = self.sigmas * self.alpha_s
            self.lambdas = np.log(self.alpha_s) - np.log(self.sigma_s)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._reset()

    def index_for_timestep(self, timestep) -> int:
        hits = np.flatnonzero(self.timesteps == float(timestep))
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    def scale_model_input(self, sample, timestep):
        return sample

    def add_noise(self, original_samples, noise, timestep):
        """alpha_t x0 + sigma_t noise, with (alpha_t, sigma_t) from the sigma at ``timestep``; ``noise``
        (numpy from a generator) is moved into the namespace of ``original_samples``."""
        sigma = self._noise_sigmas(timestep)
        alpha_t = f32(1) / np.sqrt(sigma * sigma + f32(1))
        sigma_t = sigma * alpha_t
        noise = to_namespace(noise, original_samples)
        return per_item(alpha_t, original_samples) * original_samples + per_item(sigma_t, original_samples) * noise

    def _convert(self, model_output, sample, i: int):
        """The model output as x0 (dpmsolver++) or eps (dpmsolver), as diffusers ``convert_model_output``."""
        cfg, kind = self.config, self.config.prediction_type
        alpha, sigma = float(self.alpha_s[i]), float(self.sigma_s[i])
        if cfg.algorithm_type.endswith("++"):
            x0 = {"epsilon": lambda: (sample - sigma * model_output) / alpha, "sample": lambda: model_output,
                  "v_prediction": lambda: alpha * sample - sigma * model_output}[kind]()
            if cfg.thresholding:
                x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0
        eps = {"epsilon": lambda: model_output, "sample": lambda: (sample - alpha * model_output) / sigma,
               "v_prediction": lambda: alpha * model_output + sigma * sample}[kind]()
        if cfg.thresholding:
            x0 = threshold_sample((sample - sigma * eps) / alpha, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            eps = (sample - alpha * x0) / sigma
        return eps

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0 + (order-2/3 terms in D1, D2), h = lambda_t - lambda_s
        cfg = self.config
        i, n = self._init_step_index(timestep), len(self.timesteps)
        final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        second = i == n - 2 and cfg.lower_order_final and n < 15
        converted = self._convert(model_output, sample, i)
        self.model_outputs = self.model_outputs[1:] + [converted]
        sample = astype(sample, namespace(sample).float32)
        noise = None
        if self.stochastic:
            need_generator(generator, cfg.algorithm_type)
            noise = to_namespace(generator.randn(model_output.shape), sample)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final:
            order = 1
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or second:
            order = 2
        else:
            order = 3
        prev_sample = self._update(order, sample, noise, i)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = i + 1
        x0 = converted if cfg.algorithm_type.endswith("++") else None
        return StepOutput(astype(prev_sample, model_output.dtype), x0)

    def _update(self, order: int, sample, noise, i: int):
        """One multistep update; D_k are divided differences of the stored outputs in lambda."""
        m = self.model_outputs
        lam = self.lambdas
        h = lam[i + 1] - lam[i]
        if h == 0:  # sigma_t == sigma_s (Karras ramp ending at sigma_min): no move; diffusers returns NaN here
            return sample + 0.0
        d = [m[-1]]
        if order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d.append(float(f32(1) / r0) * (m[-1] - m[-2]))
        elif order == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = float(f32(1) / r0) * (m[-1] - m[-2]), float(f32(1) / r1) * (m[-2] - m[-3])
            d.append(d1_0 + float(r0 / (r0 + r1)) * (d1_0 - d1_1))
            d.append(float(f32(1) / (r0 + r1)) * (d1_0 - d1_1))
        a, coeffs, c_noise = self._coefficients(order, h, i)
        x = float(a) * sample
        for coeff, term in zip(coeffs, d):
            x = x + float(coeff) * term
        if noise is not None:
            x = x + float(c_noise) * noise
        return x

    def _coefficients(self, order: int, h, i: int):
        """float32 (sample coeff, [D0, D1, D2 coeffs], noise coeff) of diffusers' update formulas."""
        kind, heun = self.config.algorithm_type, self.config.solver_type == "heun" or order == 3
        at, st = self.alpha_s[i + 1], self.sigma_s[i + 1]
        a0, s0 = self.alpha_s[i], self.sigma_s[i]
        c_noise = None
        with np.errstate(over="ignore", invalid="ignore"):
            em, ep, e2 = np.exp(-h), np.exp(h), np.exp(f32(-2.0) * h)
            if kind == "dpmsolver++":
                a, b = st / s0, [-(at * (em - f32(1)))]
                b.append(at * ((em - f32(1)) / h + f32(1)) if heun else -(f32(0.5) * (at * (em - f32(1)))))
                b.append(-(at * ((em - f32(1) + h) / (h * h) - f32(0.5))))
            elif kind == "dpmsolver":
                a, b = at / a0, [-(st * (ep - f32(1)))]
                b.append(-(st * ((ep - f32(1)) / h - f32(1))) if heun else -(f32(0.5) * (st * (ep - f32(1)))))
                b.append(-(st * ((ep - f32(1) - h) / (h * h) - f32(0.5))))
            elif kind == "sde-dpmsolver++":
                a, b = st / s0 * em, [at * (f32(1) - e2)]
                b.append(at * ((f32(1) - e2) / (f32(-2.0) * h) + f32(1)) if heun else f32(0.5) * (at * (f32(1) - e2)))
                b.append(at * ((f32(1) - e2 - f32(2.0) * h) / ((f32(2.0) * h) ** 2) - f32(0.5)))
                c_noise = st * np.sqrt(f32(1) - e2)
            else:
                a, b = at / a0, [-(f32(2.0) * (st * (ep - f32(1))))]
                b.append(-(f32(2.0) * (st * ((ep - f32(1)) / h - f32(1)))) if self.config.solver_type == "heun"
                         else -(st * (ep - f32(1))))
                c_noise = st * np.sqrt(np.exp(f32(2.0) * h) - f32(1))
        return a, b[:order], c_noise
