"""Classifier-free guidance (Ho & Salimans 2022), the only place it is computed."""

from __future__ import annotations

import math

import numpy as np

from sdrt.errors import InputError


def check_guidance(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(scale) or scale < 0:
        raise InputError(f"guidance must be a finite number >= 0, got {scale!r}")
    return float(scale)


def uses_cfg(scale: float) -> bool:
    """diffusers' rule: guidance > 1 runs the UNet on [uncond; cond]; otherwise cond alone (batch 1)."""
    return scale > 1.0


def guide(noise_pred, scale: float):
    """eps = eps_uncond + s * (eps_cond - eps_uncond) on a batch laid out [uncond; cond]; slicing and
    operators only, so it runs on any Array-API namespace (numpy, cupy)."""
    half = noise_pred.shape[0] // 2
    uncond, cond = noise_pred[:half, ...], noise_pred[half:, ...]
    return uncond + scale * (cond - uncond)
