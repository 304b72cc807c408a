"""Scheduler configuration: one frozen dataclass read from a diffusers ``scheduler_config.json``.

As ``diffusers.ConfigMixin.from_config``, per scheduler class: a key the class reads (an argument of the
diffusers class's ``__init__``) takes the file's value, a key missing from the file takes the class's
default, a key the class does not read is ignored (it may belong to the class the file was written for).
Every key a class reads is implemented, or listed in its ``refused`` table with the one value that leaves
the math unchanged, or in its ``inert`` set (read by diffusers, but only for refused features); any other
value is refused with a ``SchedulerConfigError`` naming the key and the class, so that no config key can
silently make sdrt sample differently from diffusers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from sdrt.errors import InputError, SchedulerConfigError

# keys every diffusers scheduler sdrt implements reads
BASE_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "timestep_spacing", "steps_offset"})
CLIP_KEYS = frozenset({"clip_sample", "clip_sample_range"})
THRESHOLD_KEYS = frozenset({"thresholding", "dynamic_thresholding_ratio", "sample_max_value"})
# the k-diffusion sigma ramps; sigma_min / sigma_max bound them (diffusers reads them with hasattr(config, ...),
# so they apply even to classes without such an __init__ argument when the file carries them)
RAMP_KEYS = frozenset({"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max"})
# flow-matching schedules (SD3/Flux/SANA-style), not implemented; their parameters only act with them on
FLOW_REFUSED = {"use_flow_sigmas": False, "use_dynamic_shifting": False}
FLOW_INERT = frozenset({"flow_shift", "time_shift_type"})

# values sdrt implements for keys whose value picks an algorithm (a class may narrow or widen these)
CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "interpolation_type": ("linear", "log_linear"),
    "timestep_type": ("discrete", "continuous"),
    "final_sigmas_type": ("zero", "sigma_min"),
}


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    timestep_spacing: str = "leading"  # leading | trailing | linspace
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False
    skip_prk_steps: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False  # DPM-Solver: uniform steps in log-SNR
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"
    variance_type: str | None = "fixed_small"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    predict_x0: bool = True
    disable_corrector: tuple = ()
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    sigma_min: float | None = None  # range override of the Karras / exponential / beta ramps
    sigma_max: float | None = None
    lambda_min_clipped: float = float("-inf")  # DPM-Solver: clip the smallest log-SNR

    @classmethod
    def from_dict(cls, data: dict, scheduler) -> "SchedulerConfig":
        """The config ``scheduler`` (a ``Scheduler`` subclass) builds from a diffusers config dict: its
        ``keys`` are read, its ``refused`` keys checked, everything else ignored (``_class_name``, ...)."""
        name = scheduler.class_name
        values = dict(scheduler.defaults)
        for key, value in data.items():
            if key in scheduler.refused:
                inert = scheduler.refused[key]
                if value != inert and (value or inert):
                    raise SchedulerConfigError(
                        f"{name}: config key {key}={value!r} is not implemented by sdrt (it changes the sampling); "
                        f"remove it or choose another scheduler")
            elif key in scheduler.keys and (value is not None or key == "trained_betas"):
                values[key] = scheduler.renames.get(key, {}).get(value, value) if isinstance(value, str) else value
        for key, allowed in {**CHOICES, **scheduler.choices}.items():
            if key in scheduler.keys and key in values and values[key] not in allowed:
                raise SchedulerConfigError(f"{name}: config key {key}={values[key]!r} is not implemented by sdrt "
                                           f"(implemented: {', '.join(map(repr, allowed))})")
        ramps = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if values.get(k)]
        if len(ramps) > 1:
            raise SchedulerConfigError(f"{name}: config sets {' and '.join(ramps)}; only one can be used")
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        if "disable_corrector" in values:
            values["disable_corrector"] = tuple(values["disable_corrector"] or ())
        try:
            config = cls(**values)
        except TypeError as exc:
            raise InputError(f"invalid scheduler config: {exc}") from None
        return config


FIELDS = frozenset(f.name for f in fields(SchedulerConfig))


def read_config(source: dict | str | Path) -> dict:
    """A diffusers scheduler config as a dict, from a dict, a json file or a folder holding one. Keys named
    in ``_use_default_values`` are dropped, as diffusers' ``extract_init_dict`` does."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "scheduler_config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read scheduler config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"scheduler config {path} is not a JSON object")
    defaulted = data.pop("_use_default_values", None) or []
    return {k: v for k, v in data.items() if k not in defaulted}
