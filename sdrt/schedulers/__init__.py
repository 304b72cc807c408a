"""Schedulers in numpy, one algorithm per file, matching the diffusers classes of the same name.

``from_config(dict_or_path, name=None)`` builds one from a diffusers ``scheduler_config.json``;
``name`` overrides the class by diffusers class name or by the names people type in A1111
("Euler a", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC", "LCM", ...).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from sdrt.errors import SchedulerNameError
from sdrt.schedulers.base import Scheduler
from sdrt.schedulers.common import StepOutput, img2img_start
from sdrt.schedulers.config import SchedulerConfig, read_config

# diffusers class name -> (module, class)
CLASSES = {
    "DDIMScheduler": ("ddim", "DDIM"),
    "PNDMScheduler": ("pndm", "PNDM"),
    "LMSDiscreteScheduler": ("lms", "LMS"),
    "EulerDiscreteScheduler": ("euler", "Euler"),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", "EulerAncestral"),
    "HeunDiscreteScheduler": ("heun", "Heun"),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", "DPMSolverMultistep"),
    "UniPCMultistepScheduler": ("unipc", "UniPC"),
    "DDPMScheduler": ("ddpm", "DDPM"),
    "LCMScheduler": ("lcm", "LCM"),
}
# schedulers with one fixed beta schedule of their own, for models other than the image UNet (Kandinsky's prior):
# from_config builds them from their configs and names, but the SD-config suites over CLASSES do not run them
OWN_SCHEDULE_CLASSES = {
    "UnCLIPScheduler": ("unclip", "UnCLIP"),
}

# names people type (A1111 and short forms) -> (diffusers class, config overrides)
ALIASES = {
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "Heun Karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}


def _key(name: str) -> str:
    key = re.sub(r"[\s_\-]+", "", name.lower()).replace("++", "pp").replace("ancestral", "a")
    return key[: -len("scheduler")] if key.endswith("scheduler") else key


_ALL = {**CLASSES, **OWN_SCHEDULE_CLASSES}
_LOOKUP = {_key(n): (n, {}) for n in _ALL} | {_key(n): v for n, v in ALIASES.items()}
_LOOKUP |= {_key(n.replace("Scheduler", "")): (n, {}) for n in _ALL}
_LOOKUP |= {"eulerancestral": ALIASES["Euler a"], "dpmpp2m": ALIASES["DPM++ 2M"],
            "dpmpp2mkarras": ALIASES["DPM++ 2M Karras"], "dpmsolver": ALIASES["DPM++ 2M"]}


def known_names() -> list[str]:
    """Every name ``from_config`` accepts, for error messages and ``--help``."""
    return list(ALIASES) + list(CLASSES) + list(OWN_SCHEDULE_CLASSES)


def resolve(name: str) -> tuple[str, dict]:
    """(diffusers class name, config overrides) for a user-typed scheduler name."""
    try:
        return _LOOKUP[_key(name)]
    except KeyError:
        raise SchedulerNameError(
            f"unknown scheduler {name!r}; known: {', '.join(known_names())}"
        ) from None


def scheduler_class(class_name: str) -> type[Scheduler]:
    if class_name not in _ALL:
        raise SchedulerNameError(
            f"scheduler class {class_name!r} is not supported; known: {', '.join(known_names())}"
        )
    module, attr = _ALL[class_name]
    return getattr(importlib.import_module(f"sdrt.schedulers.{module}"), attr)


def from_config(source: dict | str | Path, name: str | None = None) -> Scheduler:
    """A scheduler from a diffusers config (dict, json file or folder), optionally renamed.

    As ``diffusers.XScheduler.from_config(config)``: the keys the chosen class reads take the config's
    values, the others its defaults, keys it does not read (written for another class) are ignored;
    overrides implied by ``name`` (e.g. Karras sigmas) win. A key that would change the chosen class's
    math in a way sdrt does not implement raises ``SchedulerConfigError`` (``SchedulerConfig.from_dict``).
    """
    data = read_config(source)
    class_name, overrides = resolve(name) if name else (data.get("_class_name"), {})
    if class_name is None:
        raise SchedulerNameError("scheduler config has no _class_name; pass a scheduler name")
    cls = scheduler_class(class_name)
    config = SchedulerConfig.from_dict({**data, **overrides}, cls)
    return cls(config)


__all__ = ["CLASSES", "OWN_SCHEDULE_CLASSES", "Scheduler", "SchedulerConfig", "StepOutput", "from_config", "img2img_start",
           "known_names", "resolve", "scheduler_class"]
