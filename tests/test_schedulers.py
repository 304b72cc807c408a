"""Parity of every sdrt scheduler with the diffusers class of the same name, computed here.

Both get the same config, the same initial noise and the same pseudo model-output sequence (a fixed
function of diffusers' model input and t plus seeded noise, float32); each integrates its own sample.
Timesteps, init_noise_sigma, scale_model_input and prev_sample must agree at every step: max abs 1e-5 for
a step from diffusers' own state, 1e-4 along a free-running trajectory (float32 rounding accumulates).
"""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch

import sdrt.schedulers as S
from sdrt.errors import InputError

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False, "trained_betas": None}
SHAPE = (2, 4, 8, 8)
STEPS = (1, 2, 3, 7, 25, 50, 100)
OPT_STEPS = (1, 7, 25)
ATOL = 1e-5  # one step from the same inputs
ATOL_TRAJ = 1e-4  # a whole free-running trajectory: torch's float32 sqrt is not correctly rounded (<= 0.75 ulp),
# so coefficients differ from IEEE sqrt by 1 ulp and ~1e-7 per-step differences add up over 100 steps

SPACINGS = [{"timestep_spacing": "linspace"}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "leading"}]
BETAS = [{"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {"beta_schedule": "squaredcos_cap_v2"}]
COMMON = SPACINGS + BETAS + [{"prediction_type": "v_prediction"}, {"steps_offset": 0}]
ZSNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
KARRAS = {"use_karras_sigmas": True}
EXP = {"use_exponential_sigmas": True}
BETA = {"use_beta_sigmas": True}
RANGE = {"sigma_min": 0.1, "sigma_max": 10.0}  # read by every ramp (diffusers: hasattr(config, "sigma_min"))
RAMPS = [EXP, BETA, {**KARRAS, **RANGE}, {**EXP, **RANGE}, {**BETA, "sigma_min": 0.05, "sigma_max": 8.0}]

# class -> option overrides; each covers an option value once, a few combine several
OPTIONS = {
    "DDIMScheduler": COMMON + [ZSNR, {"prediction_type": "sample"}, {"set_alpha_to_one": True},
                               {"clip_sample": True}, {"thresholding": True, "sample_max_value": 1.5},
                               {"clip_sample": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
                               {"clip_sample": False, "clip_sample_range": 3.0}, {"clip_sample": True, "clip_sample_range": 0.5},
                               {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.2}],
    "PNDMScheduler": COMMON + [{"set_alpha_to_one": True},
                               {"set_alpha_to_one": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}],
    "DDPMScheduler": COMMON + [ZSNR, {"prediction_type": "sample"}, {"clip_sample": True},
                               {"variance_type": "fixed_small_log"}, {"variance_type": "fixed_large"},
                               {"thresholding": True}, {"variance_type": "fixed_large", "timestep_spacing": "linspace"},
                               {"clip_sample": True, "clip_sample_range": 0.5},
                               {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}],
    "LCMScheduler": BETAS + [{"prediction_type": "v_prediction"}, {"set_alpha_to_one": True},
                             {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
                             {"clip_sample": True}, {"prediction_type": "sample"}, {"timestep_scaling": 5.0},
                             {"original_inference_steps": 25, "set_alpha_to_one": True},
                             {"thresholding": True, "sample_max_value": 1.5}, {"steps_offset": 1},
                             {"clip_sample": True, "clip_sample_range": 0.5}, {"thresholding": True, "dynamic_thresholding_ratio": 0.9}],
    "UniPCMultistepScheduler": COMMON + [
        KARRAS, {"solver_type": "bh1"}, {"solver_order": 3}, {"solver_order": 1}, {"predict_x0": False, "final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min"}, {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, {"disable_corrector": [0]},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"prediction_type": "sample"}, {"thresholding": True, "sample_max_value": 2.0},
        {"solver_type": "bh1", "solver_order": 3, "use_karras_sigmas": True},
        {"solver_type": "bh1", "predict_x0": False, "final_sigmas_type": "sigma_min"},
        {"solver_order": 3, "prediction_type": "v_prediction", "lower_order_final": False,
         "final_sigmas_type": "sigma_min"},
        *RAMPS, {**EXP, "final_sigmas_type": "sigma_min"}, {**BETA, "solver_order": 3, "prediction_type": "v_prediction"},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.2},
        {"solver_type": "midpoint"}, {"solver_p": None, "use_flow_sigmas": False, "flow_shift": 3.0, "shift_terminal": None}],
    "LMSDiscreteScheduler": COMMON + [KARRAS, {**KARRAS, "prediction_type": "v_prediction"}, *RAMPS],
    "EulerDiscreteScheduler": COMMON + [
        KARRAS, ZSNR, {**KARRAS, "timestep_spacing": "trailing"}, *RAMPS, {**EXP, **ZSNR},
        {"interpolation_type": "log_linear"}, {"interpolation_type": "log_linear", **KARRAS},
        {"timestep_type": "continuous", "prediction_type": "v_prediction"}, {"timestep_type": "continuous"},
        {"final_sigmas_type": "sigma_min"}, {"sigma_min": 0.1, "sigma_max": 10.0}],
    "EulerAncestralDiscreteScheduler": COMMON + [ZSNR, {"rescale_betas_zero_snr": True, "timestep_spacing": "linspace"}],
    "HeunDiscreteScheduler": COMMON + [KARRAS, {**KARRAS, "prediction_type": "v_prediction"}, *RAMPS,
                                       {"clip_sample": True, "clip_sample_range": 0.8}],
    "DPMSolverMultistepScheduler": COMMON + [
        KARRAS, {"solver_order": 1}, {"solver_order": 3}, {"final_sigmas_type": "sigma_min"},
        {"solver_type": "heun"}, {"lower_order_final": False}, {"euler_at_final": True},
        {**KARRAS, "solver_order": 3, "final_sigmas_type": "sigma_min"}, {**KARRAS, "prediction_type": "v_prediction"},
        *RAMPS, {"use_lu_lambdas": True}, {"use_lu_lambdas": True, "solver_order": 3, "timestep_spacing": "trailing"},
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        {"algorithm_type": "dpmsolver", "solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
        {"algorithm_type": "sde-dpmsolver++"}, {"algorithm_type": "sde-dpmsolver++", **KARRAS},
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "prediction_type": "v_prediction"},
        {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
        {"algorithm_type": "sde-dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
        {"lambda_min_clipped": -2.0}, {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"},
        {"thresholding": True, "sample_max_value": 1.5}, {"thresholding": True, "dynamic_thresholding_ratio": 0.9},
        {"algorithm_type": "dpmsolver", "thresholding": True, "final_sigmas_type": "sigma_min"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"solver_type": "bh2"}, {"use_flow_sigmas": False, "flow_shift": 3.0, "time_shift_type": "exponential"}],
}
# ours is checked against a different diffusers config where diffusers' own result is NaN
REF_OVERRIDES = {("DDPMScheduler", "fixed_large_log"): {"variance_type": "fixed_large"}}
OPTIONS["DDPMScheduler"].append({"variance_type": "fixed_large_log"})
STEP_LIMITS = {"LCMScheduler": 50}  # LCM cannot take more steps than original_inference_steps
PRK_STEPS = (4, 7, 25)  # PNDM's PRK warmup needs >= 4 steps (diffusers crashes below)


class TorchDraw:
    """An sdrt-style generator drawing from a seeded torch.Generator, as diffusers' randn_tensor does."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, shape):
        return torch.randn(tuple(shape), generator=self.g).numpy()


def build(class_name: str, overrides: dict, ref_overrides: dict | None = None, name: str | None = None):
    """(sdrt, diffusers) schedulers of ``class_name`` from SD15 + ``overrides``; with ``name`` (what a user types),
    diffusers' class gets the name's overrides as from_config keyword arguments, as export/verify.py does."""
    cfg = {**SD15, **overrides}
    ours = S.from_config(cfg, name=name or class_name)
    kwargs = S.resolve(name)[1] if name else {}
    ref = getattr(diffusers, class_name).from_config({**cfg, **(ref_overrides or {})}, **kwargs)
    return ours, ref


def pseudo_model(x: np.ndarray, t: float, i: int, alphas_cumprod: np.ndarray, prediction_type: str) -> np.ndarray:
    """The optimal denoiser for N(0, 0.5^2) data at training time t, plus 5% seeded noise: realistic magnitudes."""
    a = float(np.interp(t, np.arange(len(alphas_cumprod)), alphas_cumprod))
    sa, sb, d = a**0.5, (1 - a) ** 0.5, a * 0.25 + (1 - a)
    eps, x0 = sb / d * x, sa * 0.25 / d * x
    out = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - sb * x0}[prediction_type]
    noise = np.random.default_rng(1000 + i).standard_normal(x.shape)
    return (out + 0.05 * noise).astype(np.float32)


def close(ours, ref: torch.Tensor, what: str, atol: float = ATOL, operand: torch.Tensor | None = None) -> None:
    ref = ref.numpy()
    ours = np.asarray(ours)
    assert ours.shape == ref.shape and ours.dtype == np.float32, (what, ours.shape, ours.dtype)
    # float32 cannot resolve 1e-5 above |x| = 32 (zero-SNR Euler starts at sigma 4096, x + dt * d cancels
    # from there): allow 4 ulp of the larger of the result and the step's input sample
    scale = max(float(np.abs(ref).max()), 0.0 if operand is None else float(abs(operand).max()))
    tol = max(atol, 4 * float(np.spacing(np.float32(scale))))
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def run_parity(class_name: str, overrides: dict, steps: int, strength: float | None = None,
               ref_overrides: dict | None = None, atol: tuple = (ATOL, ATOL_TRAJ), name: str | None = None) -> None:
    """Two sdrt instances run beside diffusers: ``tf`` is fed diffusers' sample before every step (so
    each step is compared alone, to ATOL), ``free`` integrates its own sample (to ATOL_TRAJ)."""
    tf, ref = build(class_name, overrides, ref_overrides, name)
    free, _ = build(class_name, overrides, ref_overrides, name)
    for sched in (tf, free, ref):
        sched.set_timesteps(steps)
    ts_ref = ref.timesteps.numpy()
    ts_ours = np.asarray(tf.timesteps)
    assert ts_ours.shape == ts_ref.shape, (ts_ours, ts_ref)
    np.testing.assert_allclose(ts_ours, ts_ref, rtol=0, atol=1e-4)
    assert tf.order == ref.order
    assert abs(float(tf.init_noise_sigma) - float(ref.init_noise_sigma)) <= ATOL * max(1.0, float(ref.init_noise_sigma))

    rng = np.random.default_rng(7)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    start = 0
    if strength is None:
        x_ours = noise * float(tf.init_noise_sigma)
        x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents, on the diffusers scheduler
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        ref_ts = ref.timesteps[t_start * ref.order:]
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(t_start * ref.order)
        start = S.img2img_start(steps, strength, tf.order)
        tf.set_begin_index(start)
        free.set_begin_index(start)
        np.testing.assert_allclose(ts_ours[start:], ref_ts.numpy(), rtol=0, atol=1e-4)
        image = rng.standard_normal(SHAPE).astype(np.float32)
        x_ref = ref.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ref_ts[:1].repeat(SHAPE[0]))
        x_ours = free.add_noise(image, noise, ts_ours[start])
        close(x_ours, x_ref, "add_noise")

    draw_tf, draw_free, g_ref = TorchDraw(3), TorchDraw(3), torch.Generator().manual_seed(3)
    ref_kwargs = {"generator": g_ref} if "generator" in inspect.signature(ref.step).parameters else {}
    last = len(ts_ref) - 1
    acp = ref.alphas_cumprod.double().numpy()
    largest = x_ref.abs().max()  # a free trajectory keeps the float32 resolution of its largest state
    prev_in = x_ref  # multistep correctors (UniC) re-read the previous step's input sample
    for i in range(start, len(ts_ref)):
        t_o, t_r = ts_ours[i], ref.timesteps[i]
        in_r = ref.scale_model_input(x_ref, t_r)
        close(tf.scale_model_input(x_ref.numpy(), t_o), in_r, f"scale_model_input step {i} t={t_r}")
        largest = max(largest, x_ref.abs().max())
        close(free.scale_model_input(x_ours, t_o), in_r, f"free scale_model_input step {i} t={t_r}", atol[1],
              largest)
        out = pseudo_model(in_r.numpy(), float(t_r), i, acp, ref.config.prediction_type)
        step_tf = tf.step(out, t_o, x_ref.numpy(), generator=draw_tf)
        x_ours = free.step(out, t_o, x_ours, generator=draw_free).prev_sample
        x_in, x_ref = x_ref, ref.step(torch.from_numpy(out), t_r, x_ref, **ref_kwargs).prev_sample
        if i == last and torch.isnan(x_ref).all() and overrides.get("solver_type") == "bh1" \
                and overrides.get("final_sigmas_type", "zero") == "zero":
            # diffusers UniPC bh1 computes B_h = h = -inf at sigma 0 and multiplies it by 0: NaN.
            # The order-1 update to sigma 0 is exactly the x0 prediction; ours returns that.
            np.testing.assert_array_equal(step_tf.prev_sample, step_tf.pred_original_sample)
            return
        if i == last and torch.isnan(x_ref).all() and class_name == "DPMSolverMultistepScheduler" \
                and overrides.get("final_sigmas_type") == "sigma_min" and overrides.get("use_karras_sigmas"):
            # Karras + sigma_min repeats the last sigma, so the final step has h = 0 and diffusers divides
            # by zero. The update's limit as h -> 0 leaves the sample unchanged; ours returns that.
            np.testing.assert_allclose(step_tf.prev_sample, x_in.numpy(), rtol=0, atol=ATOL)
            return
        operand = torch.maximum(x_in.abs().max(), prev_in.abs().max())
        close(step_tf.prev_sample, x_ref, f"prev_sample step {i} t={t_r}", atol[0], operand)
        prev_in = x_in
        close(x_ours, x_ref, f"free prev_sample step {i} t={t_r}", atol[1], largest)


# At t ~ 999 linear / cosine schedules have alpha_cumprod 4e-5 / 2.4e-9: x0 = (x - sqrt(1-a) eps) / sqrt(a)
# turns a 1-ulp difference of torch's sqrt(1-a) into 1/sqrt(a) times more (LCM outputs that x0 directly,
# UniPC keeps it in its history). diffusers' own float32 result is no closer to the exact one there.
ILL_CONDITIONED = {("LCMScheduler", "linear"), ("LCMScheduler", "squaredcos_cap_v2"),
                   ("UniPCMultistepScheduler", "squaredcos_cap_v2"), ("DPMSolverMultistepScheduler", "squaredcos_cap_v2")}
# Heun with 2 steps: its corrector divides by the smallest sigma (0.0292) after a subtraction that cancels
# most digits, so the 1-ulp difference of torch's (MKL) float32 sqrt in that sigma becomes ~3e-5.
ILL_CONDITIONED_STEPS = {("HeunDiscreteScheduler", 2)}


def ill_conditioned(class_name: str, overrides: dict) -> bool:
    """Beta sigmas crowd the first steps at t ~ 999 (alpha_cumprod ~ 0.005), where UniPC's third-order update
    divides x0 differences by products of small log-SNR steps. There diffusers' float32 result departs from a
    float64 evaluation of the same update (same float32 tables) by 2.4e-4 after 4 of 25 steps, sdrt's by 5e-7."""
    return (class_name, overrides.get("beta_schedule")) in ILL_CONDITIONED or (
        class_name == "UniPCMultistepScheduler" and overrides.get("use_beta_sigmas") and overrides.get("solver_order") == 3)


def _option_id(opts: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "sd15"


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("class_name", list(S.CLASSES))
def test_sd15_parity(class_name, steps):
    if steps > STEP_LIMITS.get(class_name, 1000):
        ours_err, ref_err = pytest.raises(InputError), pytest.raises(ValueError)
        with ours_err:
            S.from_config(SD15, name=class_name).set_timesteps(steps)
        with ref_err:
            getattr(diffusers, class_name).from_config(SD15).set_timesteps(steps)
        return
    ill = (class_name, steps) in ILL_CONDITIONED_STEPS
    run_parity(class_name, {}, steps, atol=(1e-4, 1e-3) if ill else (ATOL, ATOL_TRAJ))


OPTION_CASES = [(c, o) for c, opts in OPTIONS.items() for o in opts]


@pytest.mark.parametrize("class_name,overrides", OPTION_CASES,
                         ids=[f"{c}-{_option_id(o)}" for c, o in OPTION_CASES])
def test_option_parity(class_name, overrides):
    ref_overrides = REF_OVERRIDES.get((class_name, overrides.get("variance_type")))
    ill = ill_conditioned(class_name, overrides)
    for steps in OPT_STEPS:
        run_parity(class_name, overrides, steps, ref_overrides=ref_overrides,
                   atol=(1e-4, 1e-3) if ill else (ATOL, ATOL_TRAJ))


@pytest.mark.parametrize("class_name", list(S.CLASSES))
def test_trained_betas_parity(class_name):
    """A config's own beta table (``trained_betas``) replaces the schedule, here a cosine-like one."""
    t = np.linspace(0, 1, 1001)
    alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.05).astype(np.float32).tolist()
    run_parity(class_name, {"trained_betas": betas, "beta_schedule": "linear"}, 7)


@pytest.mark.parametrize("overrides", [{"predict_x0": False}, {"lower_order_final": False},
                                       {"lower_order_final": False, "solver_order": 3}])
def test_unipc_nan_configs_refused(overrides):
    """diffusers returns NaN/inf (or a singular solve) on the step to sigma 0 here; sdrt refuses up front."""
    ours, ref = build("UniPCMultistepScheduler", overrides)
    with pytest.raises(InputError, match="sigma_min"):
        ours.set_timesteps(5)
    ref.set_timesteps(5)
    x = torch.ones(1, 4)
    try:
        for t in ref.timesteps:
            x = ref.step(0.5 * x, t, x).prev_sample
    except RuntimeError:
        return
    assert not torch.isfinite(x).all()


@pytest.mark.parametrize("steps", PRK_STEPS)
@pytest.mark.parametrize("overrides", [{"skip_prk_steps": False}, {"skip_prk_steps": False, "set_alpha_to_one": True,
                                       "prediction_type": "v_prediction", "timestep_spacing": "linspace"}])
def test_pndm_prk_parity(overrides, steps):
    run_parity("PNDMScheduler", overrides, steps)


def test_pndm_prk_needs_four_steps():
    with pytest.raises(InputError):
        S.from_config({**SD15, "skip_prk_steps": False}, name="PNDM").set_timesteps(3)


@pytest.mark.parametrize("class_name", list(S.CLASSES))
@pytest.mark.parametrize("strength", (0.3, 0.5, 0.75, 1.0))
def test_img2img_parity(class_name, strength):
    for steps in (10, 25, 50):
        run_parity(class_name, {}, steps, strength=strength)


@pytest.mark.parametrize("class_name", list(S.CLASSES))
def test_bad_steps(class_name):
    sched = S.from_config(SD15, name=class_name)
    for steps in (0, -1, 1001):
        with pytest.raises(InputError):
            sched.set_timesteps(steps)


STOCHASTIC_CASES = [(c, {}) for c in S.CLASSES] + [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"})]


@pytest.mark.parametrize("class_name,overrides", STOCHASTIC_CASES,
                         ids=[f"{c}-{_option_id(o)}" for c, o in STOCHASTIC_CASES])
def test_stochastic_flag(class_name, overrides):
    """``stochastic`` is True exactly where diffusers' first step draws noise (two diffusers steps seeded
    differently differ); such a step refuses a missing generator, a deterministic one ignores it and
    matches diffusers."""
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)

    def ref_step(seed: int) -> torch.Tensor:
        ref = build(class_name, overrides)[1]
        ref.set_timesteps(3)
        torch.manual_seed(seed)  # a draw from torch's global generator shows too
        kwargs = {"generator": torch.Generator().manual_seed(seed)} \
            if "generator" in inspect.signature(ref.step).parameters else {}
        return ref.step(torch.from_numpy(0.5 * x), ref.timesteps[0], torch.from_numpy(x), **kwargs).prev_sample

    def our_step(generator=None):
        ours = build(class_name, overrides)[0]
        ours.set_timesteps(3)
        return ours.step(0.5 * x, ours.timesteps[0], x, generator=generator).prev_sample

    draws = not torch.equal(ref_step(1), ref_step(2))
    assert build(class_name, overrides)[0].stochastic == draws
    if draws:
        with pytest.raises(InputError, match="generator"):
            our_step()
    else:
        np.testing.assert_array_equal(our_step(), our_step(TorchDraw(1)))
        close(our_step(), ref_step(1), "deterministic first step", operand=torch.from_numpy(x))
