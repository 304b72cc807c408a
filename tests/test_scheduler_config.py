"""Which scheduler config keys sdrt reads, refuses or ignores, checked against the installed diffusers.

Rule (sdrt/schedulers/config.py): every key the diffusers class reads is implemented (parity in
tests/test_schedulers.py OPTIONS), or refused with one line naming the key and the class, or passes at the
value that leaves the math unchanged; keys the class does not read are ignored, as diffusers ignores them.
"""

from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import pytest

import sdrt.schedulers as S
from sdrt.errors import InputError, SchedulerConfigError, SchedulerNameError
from sdrt.schedulers.config import FIELDS
from sdrt.schedulers.sigmas import beta_ppf
from tests.test_schedulers import BETA, EXP, KARRAS, RANGE, SD15, build, run_parity

CLASSES = list(S.CLASSES)


def plain(value):
    """A config value comparable across sdrt (tuples) and diffusers (lists)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def diffusers_reads(class_name: str) -> set[str]:
    """The keys diffusers' class reads: its ``__init__`` arguments, plus sigma_min / sigma_max where its sigma
    ramps read them with ``hasattr(self.config, ...)`` (from_config keeps every file key on the config)."""
    ref_cls = getattr(diffusers, class_name)
    keys = set(inspect.signature(ref_cls.__init__).parameters) - {"self"}
    if 'hasattr(self.config, "sigma_min")' in inspect.getsource(ref_cls):
        keys |= {"sigma_min", "sigma_max"}
    return keys


@pytest.mark.parametrize("class_name", CLASSES)
def test_every_key_diffusers_reads_is_handled(class_name):
    cls = S.scheduler_class(class_name)
    parts = [set(cls.keys), set(cls.refused), set(cls.inert)]
    handled = set.union(*parts)
    assert handled == diffusers_reads(class_name), (handled ^ diffusers_reads(class_name))
    assert sum(map(len, parts)) == len(handled)  # each key in one place
    assert set(cls.keys) <= FIELDS


REFUSED_VALUES = {"use_flow_sigmas": True, "use_dynamic_shifting": True, "solver_p": {"_class_name": "DDIMScheduler"},
                  "shift_terminal": 0.5}
REFUSED = [(c, k) for c in CLASSES for k in S.scheduler_class(c).refused]


@pytest.mark.parametrize("class_name,key", REFUSED, ids=[f"{c}-{k}" for c, k in REFUSED])
def test_unimplemented_key_refused(class_name, key):
    """A key the class reads that sdrt does not implement: refused on one line naming key and class;
    at its inert value it passes (parity of those configs: OPTIONS in tests/test_schedulers.py)."""
    with pytest.raises(SchedulerConfigError) as exc:
        S.from_config({**SD15, key: REFUSED_VALUES[key]}, name=class_name)
    message = str(exc.value)
    assert key in message and class_name in message and "\n" not in message
    inert = S.scheduler_class(class_name).refused[key]
    S.from_config({**SD15, key: inert}, name=class_name).set_timesteps(5)


BAD_VALUES = [
    ("DDPMScheduler", "variance_type", "learned_range"), ("DPMSolverMultistepScheduler", "variance_type", "learned"),
    ("DDPMScheduler", "beta_schedule", "sigmoid"), ("DPMSolverMultistepScheduler", "prediction_type", "flow_prediction"),
    ("UniPCMultistepScheduler", "prediction_type", "flow_prediction"), ("DPMSolverMultistepScheduler", "algorithm_type", "deis"),
    ("PNDMScheduler", "prediction_type", "sample"), ("EulerAncestralDiscreteScheduler", "prediction_type", "sample"),
    ("EulerDiscreteScheduler", "interpolation_type", "cubic"), ("EulerDiscreteScheduler", "timestep_type", "edm"),
    ("LMSDiscreteScheduler", "timestep_spacing", "karras"), ("UniPCMultistepScheduler", "solver_type", "dpm"),
    ("DPMSolverMultistepScheduler", "solver_order", 4), ("EulerDiscreteScheduler", "final_sigmas_type", "sigma_max"),
]


@pytest.mark.parametrize("class_name,key,value", BAD_VALUES, ids=[f"{c}-{k}={v}" for c, k, v in BAD_VALUES])
def test_unimplemented_value_refused(class_name, key, value):
    with pytest.raises(SchedulerConfigError) as exc:
        S.from_config({**SD15, key: value}, name=class_name)
    message = str(exc.value)
    assert key in message and class_name in message and repr(value) in message and "\n" not in message


@pytest.mark.parametrize("class_name", ["EulerDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
                                        "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_two_sigma_ramps_refused(class_name):
    cfg = {**SD15, **KARRAS, **BETA}
    with pytest.raises(SchedulerConfigError, match="use_karras_sigmas and use_beta_sigmas"):
        S.from_config(cfg, name=class_name)
    with pytest.raises(ValueError, match="Only one of"):
        getattr(diffusers, class_name).from_config(cfg)


@pytest.mark.parametrize("class_name", CLASSES)
def test_harmless_keys_pass(class_name):
    """Private keys, a null trained_betas, a clip range with clipping off, keys no class reads and keys of other
    classes (Karras sigmas for DDIM, ...) change nothing: same config and tables as the bare SD1.5 config."""
    cls = S.scheduler_class(class_name)
    foreign = {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver", "use_flow_sigmas": True, "solver_p": 1,
               "variance_type": "learned", "skip_prk_steps": False, "rescale_betas_zero_snr": True}
    foreign = {k: v for k, v in foreign.items() if k not in diffusers_reads(class_name)}
    extra = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.30.0", "trained_betas": None,
             "clip_sample_range": 2.0, "not_a_scheduler_key": [1, 2], **foreign}
    plain_sched = S.from_config({**SD15, "clip_sample": False}, name=class_name)
    ours = S.from_config({**SD15, "clip_sample": False, **extra}, name=class_name)
    for key in cls.keys - {"clip_sample_range"}:
        assert getattr(ours.config, key) == getattr(plain_sched.config, key), key
    ours.set_timesteps(10)
    plain_sched.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, plain_sched.timesteps)
    run_parity(class_name, {"clip_sample": False, **extra}, 7)  # and diffusers ignores them as well


FOREIGN = [  # (scheduler run, config written for another class): diffusers' from_config keeps what the run class reads
    ("EulerAncestralDiscreteScheduler", {"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True,
                                         "algorithm_type": "sde-dpmsolver++", "use_flow_sigmas": True}),
    ("UniPCMultistepScheduler", {"_class_name": "DPMSolverMultistepScheduler", "solver_type": "midpoint",
                                 "algorithm_type": "sde-dpmsolver++", "euler_at_final": True, "lower_order_final": False,
                                 "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "predict_x0": True,
                                     "disable_corrector": [0], "solver_p": None, "shift_terminal": None}),
    ("HeunDiscreteScheduler", {"_class_name": "EulerDiscreteScheduler", **RANGE, **KARRAS,
                               "interpolation_type": "log_linear", "timestep_type": "continuous"}),
    ("LMSDiscreteScheduler", {"_class_name": "EulerDiscreteScheduler", "sigma_min": 0.2, **EXP,
                              "rescale_betas_zero_snr": True, "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"_class_name": "EulerDiscreteScheduler", "sigma_max": 7.0, **KARRAS}),
    ("PNDMScheduler", {"_class_name": "DDIMScheduler", "clip_sample": True, "thresholding": True,
                       "rescale_betas_zero_snr": True}),
    ("DDIMScheduler", {"_class_name": "LCMScheduler", "original_inference_steps": 25, "timestep_scaling": 5.0}),
]


@pytest.mark.parametrize("class_name,overrides", FOREIGN, ids=[f"{o['_class_name']}-as-{c}" for c, o in FOREIGN])
def test_config_of_another_class(class_name, overrides):
    for steps in (7, 25):
        run_parity(class_name, overrides, steps)


MODEL_CONFIG = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++",
                "solver_type": "midpoint", "use_lu_lambdas": True, "euler_at_final": True, "timestep_spacing": "trailing",
                "interpolation_type": "log_linear", "variance_type": None, "use_flow_sigmas": False, "flow_shift": 1.0,
                "rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "thresholding": False}


@pytest.mark.parametrize("name", list(S.ALIASES))
def test_typed_name_on_a_model_config(name):
    """``--scheduler NAME`` on a model whose config is another class's: sdrt samples as diffusers'
    ``Class.from_config(config, **name_overrides)`` (export/verify.py's reference)."""
    class_name = S.resolve(name)[0]
    steps = 4 if class_name == "LCMScheduler" else 7
    run_parity(class_name, MODEL_CONFIG, steps, name=name)


ROUND_TRIP = [(c, {}) for c in CLASSES] + [
    ("EulerDiscreteScheduler", {**KARRAS, "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("EulerDiscreteScheduler", {**BETA, **RANGE, "interpolation_type": "log_linear"}),
    ("DPMSolverMultistepScheduler", {**KARRAS, "algorithm_type": "sde-dpmsolver++", "euler_at_final": True}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True, "lambda_min_clipped": -2.0, "solver_order": 3}),
    ("UniPCMultistepScheduler", {**EXP, "final_sigmas_type": "sigma_min", "disable_corrector": [1]}),
    ("LMSDiscreteScheduler", BETA), ("HeunDiscreteScheduler", {**KARRAS, **RANGE, "clip_sample": True}),
]


@pytest.mark.parametrize("class_name,overrides", ROUND_TRIP, ids=[f"{c}-{o}" for c, o in ROUND_TRIP])
def test_saved_config_round_trips(tmp_path, class_name, overrides):
    """A scheduler folder as diffusers writes it (every key, defaults included: use_flow_sigmas false, solver_p
    null, lambda_min_clipped -Infinity, ...) loads by its _class_name with diffusers' value for every key
    sdrt reads, and samples as diffusers."""
    ref = getattr(diffusers, class_name).from_config({**SD15, **overrides})
    ref.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == class_name and set(saved) >= diffusers_reads(class_name) - {"sigma_min", "sigma_max"}
    ours = S.from_config(tmp_path)
    assert ours.class_name == class_name
    for key in ours.keys:
        assert plain(getattr(ours.config, key)) == plain(ref.config.get(key)), key
    run_parity(class_name, saved, 10)


def test_unreadable_config_is_input_error(tmp_path):
    (tmp_path / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        S.from_config(tmp_path)


def test_use_default_values_dropped():
    """Keys listed in ``_use_default_values`` take the class default, as diffusers' extract_init_dict does."""
    cfg = {**SD15, **KARRAS, "_use_default_values": ["use_karras_sigmas"]}
    assert not S.from_config(cfg, name="EulerDiscreteScheduler").config.use_karras_sigmas
    assert not diffusers.EulerDiscreteScheduler.from_config(cfg).config.use_karras_sigmas


def test_beta_ppf_matches_scipy():
    """sdrt's Beta quantiles (no scipy at runtime) against scipy.stats.beta.ppf, which diffusers calls."""
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (2, 3, 7, 25, 100, 1000):
        q = 1 - np.linspace(0, 1, n)
        expected = np.array([scipy_stats.beta.ppf(v, 0.6, 0.6) for v in q])
        np.testing.assert_allclose(beta_ppf(q, 0.6, 0.6), expected, rtol=0, atol=1e-13)
    q = np.random.default_rng(0).uniform(1e-6, 1 - 1e-6, 300)
    for a, b in ((0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (2.0, 5.0), (1.0, 1.0)):
        np.testing.assert_allclose(beta_ppf(q, a, b), scipy_stats.beta.ppf(q, a, b), rtol=0, atol=1e-13)


def test_sigma_tables_match_diffusers():
    """The new ramps' tables alone, many step counts: exponential / beta / Lu sigmas and timesteps."""
    cases = [("EulerDiscreteScheduler", EXP), ("EulerDiscreteScheduler", {**BETA, **RANGE}), ("LMSDiscreteScheduler", BETA),
             ("HeunDiscreteScheduler", EXP), ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
             ("DPMSolverMultistepScheduler", BETA), ("UniPCMultistepScheduler", {**EXP, **RANGE})]
    for class_name, overrides in cases:
        for steps in (1, 2, 5, 13, 50, 200):
            ours, ref = build(class_name, overrides)
            ours.set_timesteps(steps)
            ref.set_timesteps(steps)
            np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)


NAMES = {"DDIM": "DDIMScheduler", "plms": "PNDMScheduler", "PLMS": "PNDMScheduler", "Euler a": "EulerAncestralDiscreteScheduler",
         "euler A": "EulerAncestralDiscreteScheduler", "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
         "dpm++ 2m karras": "DPMSolverMultistepScheduler", "UniPC": "UniPCMultistepScheduler",
         "unipc": "UniPCMultistepScheduler", "LCM": "LCMScheduler", "lcm": "LCMScheduler", "DDPM": "DDPMScheduler",
         "LMS": "LMSDiscreteScheduler", "Heun": "HeunDiscreteScheduler", "Euler": "EulerDiscreteScheduler",
         **{c: c for c in S.CLASSES}, **{c.lower(): c for c in S.CLASSES}, **{c.upper(): c for c in S.CLASSES}}


@pytest.mark.parametrize("name,class_name", list(NAMES.items()))
def test_names(name, class_name):
    assert S.resolve(name)[0] == class_name
    sched = S.from_config(SD15, name=name)
    assert sched.class_name == class_name
    if "karras" in name.lower():
        assert sched.config.use_karras_sigmas


def test_unknown_name():
    with pytest.raises(SchedulerNameError) as exc:
        S.from_config(SD15, name="Euler b")
    for known in ("DDIM", "Euler a", "DPM++ 2M Karras", "UniPC", "LCM"):
        assert known in str(exc.value)
    with pytest.raises(SchedulerNameError):
        S.from_config({**SD15, "_class_name": "FooScheduler"})


@pytest.mark.parametrize("class_name", list(S.CLASSES))
def test_class_defaults_follow_diffusers(class_name):
    """Every key the class reads that a config leaves out takes the diffusers class's default."""
    bare = {"num_train_timesteps": 1000}
    ours = S.from_config(bare, name=class_name)
    ref = getattr(diffusers, class_name).from_config(bare).config
    for key in ours.keys:
        assert plain(getattr(ours.config, key)) == plain(ref.get(key)), (class_name, key)


def test_export_warns_about_a_model_config_it_cannot_run(caplog):
    """The exporter says so at export time (a WARNING, shown by default) when the model's own config would be
    refused at run time; a config sdrt runs passes silently."""
    from sdrt_export.artifact import check_scheduler as _check_scheduler

    config = {"_class_name": "EulerDiscreteScheduler", "prediction_type": "flow_prediction"}
    with caplog.at_level("WARNING", logger="sdrt_export.exporter"):
        _check_scheduler(config)
    assert any("prediction_type" in r.getMessage() and "--scheduler" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdrt_export.exporter"):
        _check_scheduler({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True})
    assert not caplog.records
