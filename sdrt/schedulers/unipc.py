"""UniPC: Zhao et al. 2023, 'UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models' (Alg. 2, B(h) variants bh1/bh2); diffusers ``UniPCMultistepScheduler``."""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError, SchedulerConfigError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import (StepOutput, check_steps, make_alphas_cumprod, sigma_to_t,
                                    sigmas_from_alphas_cumprod, threshold_sample, to_namespace)
from sdrt.schedulers.config import BASE_KEYS, FLOW_INERT, FLOW_REFUSED, RAMP_KEYS, THRESHOLD_KEYS
from sdrt.schedulers.sigmas import ramp_sigmas

f32 = np.float32


class UniPC(Scheduler):
    """Multistep UniP predictor + UniC corrector in log-SNR lambda, float32 coefficients as diffusers."""

    class_name = "UniPCMultistepScheduler"
    defaults = {"timestep_spacing": "linspace", "solver_type": "bh2", "solver_order": 2, "predict_x0": True,
                "lower_order_final": True, "final_sigmas_type": "zero", "use_karras_sigmas": False}
    keys = BASE_KEYS | THRESHOLD_KEYS | RAMP_KEYS | {"solver_order", "predict_x0", "solver_type", "lower_order_final",
                                                     "disable_corrector", "final_sigmas_type", "rescale_betas_zero_snr"}
    refused = {**FLOW_REFUSED, "solver_p": None, "shift_terminal": None}  # solver_p: another scheduler as predictor
    inert = FLOW_INERT
    choices = {"solver_type": ("bh1", "bh2")}
    renames = {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}  # as diffusers' __init__

    def __init__(self, config):
        super().__init__(config)
        if not isinstance(config.solver_order, int) or config.solver_order < 1:
            raise SchedulerConfigError(f"{self.class_name}: solver_order must be an integer >= 1, "
                                       f"got {config.solver_order!r}")
        self.bh1 = config.solver_type == "bh1"
        self.alphas_cumprod = make_alphas_cumprod(config)
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg, n = self.config, int(num_inference_steps)
        check_steps(num_inference_steps, cfg.num_train_timesteps)
        n_train, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
        if spacing == "linspace":
            ts = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (n_train // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
        elif spacing == "trailing":
            ts = np.arange(n_train, 0, -n_train / n).round() - 1
        else:
            raise InputError(f"timestep_spacing {spacing!r} is not supported (leading, trailing, linspace)")
        full = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sig = ramp_sigmas(cfg, full[::-1], n)
        if sig is not None:
            ts = sigma_to_t(sig, np.log(full))
            ts = ts.round() if cfg.use_karras_sigmas else ts  # exponential / beta: truncated below, as diffusers
            last = sig[-1]
        else:
            sig = np.interp(ts.astype(np.int64), np.arange(len(full)), full)
            last = full[0]
        to_zero = cfg.final_sigmas_type == "zero"
        if to_zero and (not cfg.predict_x0 or (not cfg.lower_order_final and cfg.solver_order > 1 and n > 1)):
            raise InputError("UniPC with predict_x0=false or lower_order_final=false needs final_sigmas_type "
                             "'sigma_min' (a step to sigma 0 is NaN there, in diffusers too)")
        self.sigmas = np.concatenate([sig, [0 if to_zero else last]]).astype(f32)
        self.alpha_t = f32(1) / np.sqrt(self.sigmas * self.sigmas + f32(1))  # sigma -> (alpha_t, sigma_t)
        self.sigma_t = self.sigmas * self.alpha_t
        with np.errstate(divide="ignore"):
            self.lambdas = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs: list = []  # converted outputs of the last solver_order steps, oldest first
        self.last_sample = None  # sample the last predictor started from (for the corrector)
        self.lower_order_nums, self.this_order = 0, 1
        self._step_index, self._begin_index = None, None

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def _index_for(self, timestep) -> int:
        hits = np.nonzero(self.timesteps == int(timestep))[0]
        return len(self.timesteps) - 1 if len(hits) == 0 else int(hits[1] if len(hits) > 1 else hits[0])

    def _convert(self, model_output, sample, i: int):
        """x0 (predict_x0) or eps from the raw model output at step i."""
        a, s, kind = float(self.alpha_t[i]), float(self.sigma_t[i]), self.config.prediction_type
        if self.config.predict_x0:
            x0 = {"epsilon": lambda: (sample - s * model_output) / a, "sample": lambda: model_output,
                  "v_prediction": lambda: a * sample - s * model_output}[kind]()
            if self.config.thresholding:
                x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            return x0
        return {"epsilon": lambda: model_output, "sample": lambda: (sample - a * model_output) / s,
                "v_prediction": lambda: a * model_output + s * sample}[kind]()

    def _coefficients(self, t: int, s0: int, order: int, corrector: bool):
        """float32 (x coeff, m0 coeff, B_h coeff, rks, rhos) for one UniP (or UniC) update from s0 to t."""
        lam = self.lambdas
        h = lam[t] - lam[s0]
        back = [s0 - k for k in range(1, order)]  # earlier steps whose outputs enter the update
        rks = np.array([(lam[si] - lam[s0]) / h for si in back] + [f32(1)], dtype=f32)
        hh = -h if self.config.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k, factorial = h_phi_1 / hh - f32(1), 1
        b_h = hh if self.bh1 else np.expm1(hh)
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(rks ** f32(i - 1))
            b.append(h_phi_k * f32(factorial) / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - f32(1 / factorial)
        r, b = np.stack(rows), np.array(b, dtype=f32)
        if corrector:
            rhos = np.array([0.5], dtype=f32) if order == 1 else np.linalg.solve(r, b)
        else:
            rhos = None if order == 1 else (np.array([0.5], dtype=f32) if order == 2 else
                                             np.linalg.solve(r[:-1, :-1], b[:-1]))
        if self.config.predict_x0:
            c_x, c_m, c_b = self.sigma_t[t] / self.sigma_t[s0], self.alpha_t[t] * h_phi_1, self.alpha_t[t] * b_h
        else:
            c_x, c_m, c_b = self.alpha_t[t] / self.alpha_t[s0], self.sigma_t[t] * h_phi_1, self.sigma_t[t] * b_h
        return float(c_x), float(c_m), float(c_b), [float(r) for r in rks[:-1]], rhos

    def _update(self, x, t: int, s0: int, order: int, model_t=None):
        """UniP (model_t None) or UniC (model_t: the converted output at t) update of x from s0 to t."""
        ms = self.model_outputs
        c_x, c_m, c_b, rks, rhos = self._coefficients(t, s0, order, model_t is not None)
        m0 = ms[-1]
        d1s = [(ms[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)]
        x_t = c_x * x - c_m * m0
        res = None
        for rho, d in zip(rhos[: len(d1s)] if rhos is not None else [], d1s):
            res = float(rho) * d if res is None else res + float(rho) * d
        if model_t is not None:
            last = float(rhos[-1]) * (model_t - m0)
            res = last if res is None else res + last
        # order-1 predictor: no correction term (diffusers multiplies B_h = -inf by 0 here for bh1 -> NaN)
        return x_t if res is None else x_t - c_b * res

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_i: sample, m_i: x0 (or eps) prediction, lambda = log(alpha_t / sigma_t); UniC then UniP (Alg. 2)
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._index_for(timestep)
        i, order = self._step_index, self.config.solver_order
        m = self._convert(model_output, sample, i)
        if i > 0 and (i - 1) not in self.config.disable_corrector and self.last_sample is not None:
            sample = self._update(self.last_sample, i, i - 1, self.this_order, model_t=m)
        self.model_outputs = (self.model_outputs + [m])[-order:]
        this_order = min(order, len(self.timesteps) - i) if self.config.lower_order_final else order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._update(sample, i + 1, i, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        self._step_index = i + 1
        return StepOutput(prev_sample, m if self.config.predict_x0 else None)

    def add_noise(self, original_samples, noise, timestep):
        """alpha_t x0 + sigma_t noise at the current (or begin) step; ``noise`` (numpy from a generator)
        is moved into the namespace of ``original_samples``."""
        noise = to_namespace(noise, original_samples)
        i = self._step_index if self._step_index is not None else (
            self._begin_index if self._begin_index is not None else self._index_for(timestep))
        return float(self.alpha_t[i]) * original_samples + float(self.sigma_t[i]) * noise
