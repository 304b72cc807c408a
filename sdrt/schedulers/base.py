"""The scheduler interface every algorithm file implements (diffusers' vocabulary)."""

from __future__ import annotations

import numpy as np

from sdrt.schedulers.common import StepOutput
from sdrt.schedulers.config import SchedulerConfig


class Scheduler:
    """Base class. Subclasses set ``class_name``/``defaults`` and implement ``set_timesteps``/``step``.

    ``set_timesteps(n)`` precomputes numpy tables; ``step`` is arithmetic on them, with samples and
    model outputs of any Array-API namespace (numpy, cupy: see ``common.namespace``); history buffers
    hold arrays of that namespace. Stochastic schedulers draw noise from ``generator.randn(shape)`` (an
    ``sdrt.rng`` generator, numpy), in the same order as diffusers' pipelines draw it, so seeds reproduce
    diffusers, and move it into the sample's namespace.
    """

    class_name = ""  # the diffusers class this file matches
    defaults: dict = {}  # that class's config defaults, applied to keys a config file leaves out
    # the config keys that class reads (its __init__ arguments), split as ``config.SchedulerConfig.from_dict``
    # uses them: ``keys`` are implemented, ``refused`` maps each unimplemented key to its one inert value,
    # ``inert`` keys only act through refused ones; other keys of a config file are ignored, as by diffusers
    keys: frozenset = frozenset()
    refused: dict = {}
    inert: frozenset = frozenset()
    choices: dict = {}  # key -> implemented values, narrowing or widening ``config.CHOICES``
    renames: dict = {}  # key -> {value: value diffusers' __init__ rewrites it to}
    order = 1
    stochastic = False  # True when step() draws noise from a generator

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.num_inference_steps = 0
        self.init_noise_sigma = 1.0
        self._begin_index = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at ``timesteps[begin_index]`` (img2img and inpaint)."""
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample, timestep):
        return sample

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        raise NotImplementedError

    def add_noise(self, original_samples, noise, timestep):
        raise NotImplementedError
