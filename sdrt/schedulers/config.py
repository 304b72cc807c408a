"""Scheduler configuration: one frozen dataclass read from a diffusers ``scheduler_config.json``.

Keys missing from the file take the defaults of the scheduler class being built (as
``diffusers.SchedulerMixin.from_config`` does), then the defaults below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from sdrt.errors import InputError


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
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"
    variance_type: str = "fixed_small"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    predict_x0: bool = True
    disable_corrector: tuple = ()
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    sigma_min: float | None = None  # Euler: Karras ramp range override
    sigma_max: float | None = None
    lambda_min_clipped: float = float("-inf")  # DPM-Solver: clip the smallest log-SNR

    @classmethod
    def from_dict(cls, data: dict, class_defaults: dict | None = None) -> "SchedulerConfig":
        """Build from a diffusers config dict; unknown keys (``_class_name``, ...) are ignored."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in (class_defaults or {}).items() if k in names}
        values.update({k: v for k, v in data.items() if k in names and (v is not None or k == "trained_betas")})
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        if "disable_corrector" in values:
            values["disable_corrector"] = tuple(values["disable_corrector"] or ())
        try:
            config = cls(**values)
        except TypeError as exc:
            raise InputError(f"invalid scheduler config: {exc}") from None
        return config


def read_config(source: dict | str | Path) -> dict:
    """A diffusers scheduler config as a dict, from a dict, a json file or a folder holding one."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "scheduler_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read scheduler config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"scheduler config {path} is not a JSON object")
    return data
