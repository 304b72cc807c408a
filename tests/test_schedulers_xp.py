"""The scheduler math and classifier-free guidance run unchanged on any Array-API namespace.

Every scheduler runs the same pseudo model-output sequence twice, on numpy arrays and on array_api_strict
arrays, with noise from identically seeded generators; results must agree to 1e-6 at every step.
array_api_strict refuses numpy arrays and scalars and every function outside the standard, so a pass
shows the loop (latents on the GPU as cupy arrays) depends on no numpy-only idiom.
"""

from __future__ import annotations

import numpy as np
import pytest

import sdrt.schedulers as S
from sdrt.guidance import guide
from sdrt.rng import TorchGenerator
from sdrt.schedulers.common import namespace, threshold_sample
from sdrt.schedulers.sigmas import SigmaScheduler

xs = pytest.importorskip("array_api_strict")

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
SHAPE = (2, 4, 8, 8)
STEPS = 7
ATOL = 1e-6
GUIDANCE = 3.0
KARRAS = {"use_karras_sigmas": True}
EXP = {"use_exponential_sigmas": True}
BETA = {"use_beta_sigmas": True}
V = {"prediction_type": "v_prediction"}
ZSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", **V}

CASES = [(c, {}) for c in S.CLASSES] + [
    ("DDIMScheduler", V), ("DDIMScheduler", {"clip_sample": True}),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 1.5}),
    ("PNDMScheduler", {"skip_prk_steps": False}), ("PNDMScheduler", V),
    ("LMSDiscreteScheduler", KARRAS), ("LMSDiscreteScheduler", V),
    ("EulerDiscreteScheduler", KARRAS), ("EulerDiscreteScheduler", V),
    ("EulerAncestralDiscreteScheduler", V),
    ("HeunDiscreteScheduler", KARRAS), ("HeunDiscreteScheduler", {"clip_sample": True, **V}),
    ("DPMSolverMultistepScheduler", KARRAS), ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "solver_type": "heun", **V}),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "thresholding": True,
                                     "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **KARRAS}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1"}), ("UniPCMultistepScheduler", {"solver_order": 3, **KARRAS}),
    ("UniPCMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min", **V}),
    ("DDPMScheduler", V), ("DDPMScheduler", {"thresholding": True}), ("DDPMScheduler", {"variance_type": "fixed_large"}),
    ("LCMScheduler", V), ("LCMScheduler", {"clip_sample": True}),
    # sigma ramps and schedule options: tables differ, step() arithmetic must stay namespace-agnostic
    ("LMSDiscreteScheduler", EXP), ("LMSDiscreteScheduler", {**BETA, "sigma_min": 0.1}),
    ("EulerDiscreteScheduler", BETA), ("EulerDiscreteScheduler", {**EXP, "sigma_max": 10.0, **ZSNR}),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear", "final_sigmas_type": "sigma_min"}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", **V}), ("EulerAncestralDiscreteScheduler", ZSNR),
    ("HeunDiscreteScheduler", EXP), ("HeunDiscreteScheduler", {**BETA, "clip_sample": True}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}), ("DPMSolverMultistepScheduler", {**BETA, **V}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, **EXP}),
    ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -2.0, "euler_at_final": True, **ZSNR}),
    ("DPMSolverMultistepScheduler", {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 1}),
    ("UniPCMultistepScheduler", EXP), ("UniPCMultistepScheduler", {**BETA, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {**ZSNR, "solver_order": 3}),
    ("DDIMScheduler", ZSNR), ("DDPMScheduler", ZSNR), ("LCMScheduler", {"thresholding": True, **ZSNR}),
]


def _id(case) -> str:
    return f"{case[0]}-" + (",".join(f"{k}={v}" for k, v in case[1].items()) or "sd15")


def host(x) -> np.ndarray:
    """A numpy copy of an array of any namespace (array_api_strict has no ``__array__`` contract; cupy's
    arrays live on the GPU)."""
    if hasattr(x, "__cuda_array_interface__"):
        return x.get()
    return np.from_dlpack(x).copy()


def pseudo_model(xp, x, t: float, i: int, alphas_cumprod: np.ndarray, prediction_type: str):
    """The optimal denoiser for N(0, 0.5^2) data at time t (as tests/test_schedulers.py) plus 5% seeded noise."""
    a = float(np.interp(t, np.arange(len(alphas_cumprod)), alphas_cumprod))
    sa, sb, d = a**0.5, (1 - a) ** 0.5, a * 0.25 + (1 - a)
    eps, x0 = sb / d, sa * 0.25 / d
    coeff = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - sb * x0}[prediction_type]
    noise = np.random.default_rng(1000 + i).standard_normal(x.shape).astype(np.float32)
    return coeff * x + 0.05 * xp.asarray(noise)


def trajectory(xp, class_name: str, overrides: dict, strength: float | None = None, dtype=np.float32,
               step_kwargs: dict | None = None) -> list:
    """Every array the loop sees, on ``xp`` arrays, as numpy copies: the start latents, then per step the
    scaled model input, prev_sample and pred_original_sample (as pipeline.py calls the scheduler, with CFG)."""
    sched = S.from_config({**SD15, **overrides}, name=class_name)
    sched.set_timesteps(STEPS)
    generator = TorchGenerator(3)
    xp_dtype = getattr(xp, np.dtype(dtype).name)
    noise = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    timesteps, start = sched.timesteps, 0
    if strength is None:
        latents = xp.asarray(noise) * float(sched.init_noise_sigma)
    else:
        start = S.img2img_start(STEPS, strength, sched.order)
        sched.set_begin_index(start)
        image = xp.asarray(np.random.default_rng(8).standard_normal(SHAPE).astype(np.float32))
        latents = sched.add_noise(image, noise, timesteps[start])
        if isinstance(sched, SigmaScheduler):  # a timestep per batch item, as diffusers' pipelines pass it
            per_item = sched.add_noise(image, noise, np.full(SHAPE[0], timesteps[start]))
            np.testing.assert_array_equal(host(per_item), host(latents))
    latents = xp.astype(latents, xp_dtype)
    seen = [latents]
    acp = np.asarray(sched.alphas_cumprod, dtype=np.float64)
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        concat = getattr(xp, "concat", None) or xp.concatenate  # cupy < 14 has only the numpy name
        model_input = sched.scale_model_input(concat([latents, latents]), t)
        out = pseudo_model(xp, model_input, float(t), i, acp, sched.config.prediction_type)
        noise_pred = guide(xp.astype(out, xp_dtype), GUIDANCE)
        result = sched.step(noise_pred, t, latents, generator=generator, **(step_kwargs or {}))
        latents = result.prev_sample
        assert namespace(latents) is namespace(noise_pred)
        seen += [model_input, latents] + ([result.pred_original_sample] if result.pred_original_sample is not None
                                          else [])
    return [host(x) for x in seen]


def check_same(class_name: str, overrides: dict, other=xs, **kwargs) -> None:
    ours, strict = trajectory(np, class_name, overrides, **kwargs), trajectory(other, class_name, overrides, **kwargs)
    assert len(ours) == len(strict)
    for k, (a, b) in enumerate(zip(ours, strict)):
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        assert np.isfinite(a).all(), k
        err = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        assert err <= ATOL, f"array {k} of the loop: numpy vs array_api_strict differ by {err:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_same_on_array_api_strict(case):
    check_same(*case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_same_on_cupy(cupy, case):
    """The GPU loop's scheduler path for real: cupy arrays on the device (``make gpu-test``)."""
    check_same(*case, other=cupy)


@pytest.mark.parametrize("class_name", list(S.CLASSES))
def test_img2img_on_array_api_strict(class_name):
    check_same(class_name, {}, strength=0.6)


def test_ddim_eta_on_array_api_strict():
    check_same("DDIMScheduler", {}, step_kwargs={"eta": 0.5})


@pytest.mark.parametrize("class_name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                        "DPMSolverMultistepScheduler"])
def test_float64_latents_on_array_api_strict(class_name):
    """These cast the sample to float32 for the update and return the model output's dtype, as diffusers
    (for float16 latents; the Array API has no float16, float64 takes the same casts)."""
    check_same(class_name, {}, dtype=np.float64)


def test_guide_and_threshold_on_array_api_strict():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(host(guide(xs.asarray(pred), 7.5)), guide(pred, 7.5))
    x0 = 2 * rng.standard_normal(SHAPE).astype(np.float32)
    for ratio in (0.995, 0.99, 0.5, 1.0, 0.0):
        ours = threshold_sample(xs.asarray(x0), ratio, 1.5)
        np.testing.assert_array_equal(host(ours), threshold_sample(x0, ratio, 1.5))
        flat = np.abs(x0.reshape(SHAPE[0], -1))
        s = np.clip(np.quantile(flat, ratio, axis=1), 1, 1.5).astype(np.float32)[:, None]
        np.testing.assert_allclose(host(ours).reshape(SHAPE[0], -1), np.clip(x0.reshape(SHAPE[0], -1), -s, s) / s,
                                   rtol=0, atol=ATOL)


def test_namespace_helper():
    assert namespace(np.zeros(2)) is np
    assert namespace(xs.asarray([1.0])) is xs
