"""LMS: linear multistep on the sigma ODE (Katherine Crowson's k-diffusion ``sample_lms``);
diffusers ``LMSDiscreteScheduler``."""

from __future__ import annotations

import numpy as np
from numpy.polynomial import Polynomial

from sdrt.schedulers.common import StepOutput
from sdrt.schedulers.config import BASE_KEYS, RAMP_KEYS
from sdrt.schedulers.sigmas import SigmaScheduler, f32, k_schedule, noise_sigma, x0_from

MAX_ORDER = 4


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Integrals over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomials through
    sigma_i, sigma_{i-1}, ..., sigma_{i-order+1}: exact, as the integrands are polynomials."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    coeffs = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-other, 1.0]) / (node - other)
        antiderivative = basis.integ()
        coeffs.append(float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i]))))
    return coeffs


class LMS(SigmaScheduler):
    """Linear multistep method of order up to 4 on the Karras et al. 2022 sigma schedule, as
    diffusers ``LMSDiscreteScheduler`` (k-diffusion, Katherine Crowson)."""

    class_name = "LMSDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace"}
    keys = BASE_KEYS | RAMP_KEYS  # sigma_min / sigma_max: exponential and beta ramps only, as diffusers

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps, self.sigmas = k_schedule(self.config, self.train_sigmas, num_inference_steps, karras_range=False)
        self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = int(num_inference_steps)
        self.init_noise_sigma = noise_sigma(self.config, self.sigmas)
        self.coefficients = [lms_coefficients(self.sigmas, i, min(i + 1, MAX_ORDER))
                             for i in range(len(self.timesteps))]
        self.derivatives = []
        self._reset()

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        # x_{i+1} = x_i + sum_j c_{ij} d_{i-j},  d = (x - x0) / sigma,  c_ij = int Lagrange_j d(sigma)
        i = self._init_step_index(timestep)
        sigma = f32(self.sigmas[i])
        x0 = x0_from(self.config, model_output, sample, sigma)
        self.derivatives.append((sample - x0) / float(sigma))
        if len(self.derivatives) > MAX_ORDER:
            self.derivatives.pop(0)
        terms = [coeff * d for coeff, d in zip(self.coefficients[i], reversed(self.derivatives))]
        prev_sample = sample + sum(terms[1:], terms[0])
        self._step_index = i + 1
        return StepOutput(prev_sample, x0)
