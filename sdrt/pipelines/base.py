"""What every family's pipeline shares: the opened ENGINE_DIR, its engine cache, stage timings, the result."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sdrt.arrays import loop_namespace
from sdrt.backends import open_engine
from sdrt.lora_runtime import LoraSessions
from sdrt.manifest import load_manifest

# callback(step_index, total_steps, timestep, latents) -> False to cancel
StepCallback = Callable[[int, int, float, np.ndarray], "bool | None"]


@dataclass
class Result:
    images: np.ndarray  # uint8 (N, H, W, 3)
    unit_images: np.ndarray  # float32 (N, H, W, 3) in [0, 1], before quantization
    seed: int
    timings: dict
    parameters: dict = field(default_factory=dict)
    seeds: list = field(default_factory=list)  # one per image when ``seed`` was a list, else [seed]

    def pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(image) for image in self.images]


class Timings:
    """Wall time per stage; stages timed several times (UNet calls) keep every sample."""

    PER_CALL = ("unet",)

    def __init__(self):
        self.samples: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.samples.setdefault(stage, []).append(time.perf_counter() - start)

    def summary(self) -> dict:
        """Seconds per stage; stages timed once per step (``PER_CALL``) stay lists."""
        return {k: (v if k in self.PER_CALL else sum(v)) for k, v in self.samples.items()}


class BasePipeline:
    """An ENGINE_DIR opened for one backend; engines open on first use and stay open."""

    # components replayed at one shape per generation (TensorRT captures them in a CUDA graph)
    CUDA_GRAPH_COMPONENTS: tuple = ()

    def __init__(self, engine_dir: str | os.PathLike, backend: str = "ort-cpu", threads: int | None = None,
                 xp=None, manifest=None):
        """``xp``: the array namespace of the denoising loop (default: cupy for GPU backends when it is
        installed, so latents stay on the device; numpy otherwise). Step callbacks get latents in it."""
        self._start = time.perf_counter()
        self.xp = loop_namespace(backend, xp)
        self.manifest = manifest if manifest is not None else load_manifest(engine_dir)
        self.backend, self.threads = backend, threads
        self._engines: dict = {}
        self.loras = LoraSessions(self.manifest)  # run-time LoRA: the set in use and its sessions
        self.dims = self.manifest.dims
        self.load_seconds = time.perf_counter() - self._start

    def engine(self, name: str):
        if self.loras.touches(name) and not self.backend.startswith("tensorrt"):  # a session with merged weights
            return self.loras.engine(name, self.backend, self.threads)
        if name not in self._engines:
            start = time.perf_counter()
            self._engines[name] = open_engine(self.manifest, name, self.backend, self.threads,
                                              cuda_graph=name in self.CUDA_GRAPH_COMPONENTS)
            self.load_seconds += time.perf_counter() - start
        return self.loras.refitted(name, self._engines[name], self.backend)  # TensorRT: refit to the set in use
