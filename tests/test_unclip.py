"""Parity of sdrt's UnCLIPScheduler with diffusers' ``UnCLIPScheduler``, computed here, at the bar of
tests/test_schedulers.py: timesteps exact, tables and each step from diffusers' own state within 1e-5, a
free-running trajectory within 1e-4, with the same generator draws (the Kandinsky prior's noise)."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch

import sdrt.schedulers as S
from sdrt.errors import InputError, SchedulerConfigError
from sdrt.schedulers.config import FIELDS
from tests.test_schedulers import ATOL, ATOL_TRAJ, TorchDraw, close, pseudo_model

PRIOR = {"_class_name": "UnCLIPScheduler", "variance_type": "fixed_small_log", "prediction_type": "sample",
         "num_train_timesteps": 1000, "clip_sample": True, "clip_sample_range": 10.0}  # Kandinsky 2.2's prior
CONFIGS = [PRIOR, {}, {"prediction_type": "epsilon", "clip_sample": False}, {"clip_sample_range": 0.5},
           {"variance_type": "learned_range"}, {"variance_type": "learned_range", "prediction_type": "sample"},
           {"num_train_timesteps": 300, "clip_sample_range": 3.0}]
STEPS = (2, 3, 7, 25, 100)
PRIOR_SHAPE, IMAGE_SHAPE = (2, 32), (2, 4, 8, 8)


def build(overrides: dict):
    """(sdrt, diffusers) schedulers from diffusers' defaults plus ``overrides``."""
    cfg = {"_class_name": "UnCLIPScheduler", **overrides}
    return S.from_config(cfg), diffusers.UnCLIPScheduler.from_config(cfg)


def model_output(x: np.ndarray, t: int, i: int, acp: np.ndarray, kind: str, learned: bool) -> np.ndarray:
    out = pseudo_model(x, float(t), i, acp, kind)
    if learned:  # the model's variance channel v in [-1, 1], as a learned-range UNet predicts it
        v = np.tanh(np.random.default_rng(50 + i).standard_normal(x.shape)).astype(np.float32)
        out = np.concatenate([out, v], axis=1)
    return out


def run_parity(overrides: dict, steps: int, shape: tuple, table_prev: bool = True) -> None:
    """``table_prev``: the prior pipeline's call (prev_timestep = timesteps[i + 1], None at the end; ours reads its
    table); otherwise each call passes prev_timestep=None (t - 1, diffusers' default), on both sides."""
    tf, ref = build(overrides)
    free, _ = build(overrides)
    for sched in (tf, free, ref):
        sched.set_timesteps(steps)
    np.testing.assert_array_equal(tf.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(tf.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(tf.betas, ref.betas.numpy(), rtol=0, atol=1e-7)
    assert tf.init_noise_sigma == ref.init_noise_sigma
    learned = ref.config.variance_type == "learned_range"
    kind = ref.config.prediction_type
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(x), x.copy()
    draw_tf, draw_free, g_ref = TorchDraw(3), TorchDraw(3), torch.Generator().manual_seed(3)
    acp = ref.alphas_cumprod.double().numpy()
    ts = ref.timesteps
    largest = x_ref.abs().max()
    for i, t in enumerate(ts):
        prev_ref = (ts[i + 1] if i + 1 < len(ts) else None) if table_prev else None
        ours_kw = {} if table_prev else {"prev_timestep": None}
        out = model_output(x_ref.numpy(), int(t), i, acp, kind, learned)
        step_tf = tf.step(out, int(t), x_ref.numpy(), generator=draw_tf, **ours_kw)
        x_ours = free.step(out, int(t), x_ours, generator=draw_free, **ours_kw).prev_sample
        step_ref = ref.step(torch.from_numpy(out), t, x_ref, prev_timestep=prev_ref, generator=g_ref)
        close(step_tf.pred_original_sample, step_ref.pred_original_sample, f"x0 step {i} t={int(t)}", ATOL, x_ref)
        close(step_tf.prev_sample, step_ref.prev_sample, f"prev_sample step {i} t={int(t)}", ATOL, x_ref)
        x_ref = step_ref.prev_sample
        largest = max(largest, x_ref.abs().max())
        close(x_ours, x_ref, f"free prev_sample step {i} t={int(t)}", ATOL_TRAJ, largest)
    # same number of draws on both sides: the generators are at the same state afterwards
    assert torch.equal(torch.randn(3, generator=draw_tf.g), torch.randn(3, generator=g_ref))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_parity(overrides, steps):
    shape = PRIOR_SHAPE if overrides is PRIOR else IMAGE_SHAPE
    run_parity(overrides, steps, shape)


@pytest.mark.parametrize("overrides", [PRIOR, {"variance_type": "learned_range"}], ids=["prior", "learned_range"])
def test_parity_prev_timestep_none(overrides):
    """Without prev_timestep diffusers steps as if to t - 1 (beta_t, alpha_t from the tables), whatever the grid."""
    run_parity(overrides, 7, IMAGE_SHAPE, table_prev=False)
    run_parity(overrides, 1000, PRIOR_SHAPE, table_prev=False)


def test_parity_full_grid():
    """1000 steps: every step is t -> t - 1, the branch that takes beta_t and alpha_t from the tables."""
    run_parity(PRIOR, 1000, PRIOR_SHAPE)


def test_add_noise_parity():
    ours, ref = build(PRIOR)
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal(IMAGE_SHAPE).astype(np.float32) for _ in range(2))
    for t in (0, 1, 250, 999):
        expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([t]))
        close(ours.add_noise(x0, noise, t), expected, f"add_noise t={t}")


@pytest.mark.parametrize("steps", (0, 1, -1, 1001, 2.5))
def test_bad_steps(steps):
    ours, ref = build(PRIOR)
    with pytest.raises(InputError):
        ours.set_timesteps(steps)
    if steps == 1:  # diffusers divides by steps - 1
        with pytest.raises(ZeroDivisionError):
            ref.set_timesteps(steps)


def test_needs_generator_and_draws_only_above_zero():
    ours, _ = build(PRIOR)
    ours.set_timesteps(3)
    x = np.ones(PRIOR_SHAPE, np.float32)
    assert ours.stochastic
    with pytest.raises(InputError, match="generator"):
        ours.step(x, 999, x)
    ours.step(x, 0, x)  # the last step draws nothing, so needs no generator


def test_every_key_diffusers_reads_is_handled():
    cls = S.scheduler_class("UnCLIPScheduler")
    assert set(cls.keys) | set(cls.refused) | set(cls.inert) == \
        set(inspect.signature(diffusers.UnCLIPScheduler.__init__).parameters) - {"self"}
    assert set(cls.keys) <= FIELDS


def test_defaults_follow_diffusers():
    ours = S.from_config({}, name="UnCLIP")
    ref = diffusers.UnCLIPScheduler.from_config({}).config
    for key in ours.keys:
        assert getattr(ours.config, key) == ref[key], key


@pytest.mark.parametrize("overrides,match", [({"beta_schedule": "linear"}, "beta_schedule"),
                                             ({"variance_type": "fixed_small"}, "variance_type"),
                                             ({"prediction_type": "v_prediction"}, "prediction_type")])
def test_unsupported_values_refused(overrides, match):
    """What diffusers' class refuses (at init, or at its first step) sdrt refuses when building it."""
    with pytest.raises(SchedulerConfigError, match=match):
        S.from_config({**PRIOR, **overrides})
    with pytest.raises(ValueError):
        ref = diffusers.UnCLIPScheduler.from_config({**PRIOR, **overrides})
        ref.set_timesteps(3)
        x = torch.ones(IMAGE_SHAPE)
        ref.step(x, ref.timesteps[0], x, generator=torch.Generator().manual_seed(0))


def test_registered_by_name():
    for name in ("UnCLIPScheduler", "UnCLIP", "unclip"):
        assert S.resolve(name)[0] == "UnCLIPScheduler"
    assert "UnCLIPScheduler" in S.known_names()
    assert "UnCLIPScheduler" not in S.CLASSES  # the SD-config suites over CLASSES do not run it
