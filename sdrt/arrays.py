"""Where the denoising loop's arrays live: numpy on the host, or a device namespace (cupy) for GPU backends.

The loop is written against the Array API (operators, slicing, ``xp.asarray``/``xp.empty``/``xp.sum``),
so with cupy the latents, the UNet feeds and the scheduler state stay on the GPU from the first copy in
to the decoded image out. Host code (tokenizer, RNG, image pre- and post-processing) stays numpy; this
module holds the crossings and the NaN/inf guard, which must not read a device array back every step.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from sdrt.errors import NumericsError

log = logging.getLogger(__name__)

GPU_BACKENDS = ("ort-cuda", "tensorrt", "tensorrt-rtx")


def loop_namespace(backend: str, requested=None):
    """The namespace the loop runs in: ``requested`` if given, cupy for GPU backends when it is installed and
    sees a CUDA device, else numpy."""
    if requested is not None:
        return requested
    if backend not in GPU_BACKENDS:
        return np
    try:
        import cupy
    except ImportError:
        log.debug("cupy is not installed: the %s loop runs on host arrays (pip install 'sdrt[gpu]' to keep "
                  "latents on the GPU)", backend)
        return np
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
        why = "no CUDA device"
    except Exception as exc:  # cupy raises CUDARuntimeError without a driver
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
    log.warning("cupy sees no GPU (%s): the %s loop runs on host arrays", why, backend)
    return np


def to_host(x) -> np.ndarray:
    """``x`` as a numpy array: one device-to-host copy for a device array, none for numpy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return x.get()
    return np.asarray(x)


def check_finite(array, stage: str, step: int | None = None, total: int | None = None):
    """Raise ``NumericsError`` naming the stage (and step) if ``array`` holds NaN or inf; returns ``array``."""
    if not math.isfinite(float(to_host(array).sum(dtype=np.float64))):  # one pass; float64 cannot overflow
        raise NumericsError(_message(stage, step, total))
    return array


def _message(stage: str, step: int | None, total: int | None) -> str:
    where = f" at step {step}/{total}" if step is not None else ""
    return f"NaN/inf in {stage}{where}: the engine overflowed (with fp16 engines, rebuild this component in fp32)"


class StepGuard:
    """The NaN/inf guard of the latents after each step. Host arrays are checked at once; on a device the
    per-step sums stay there and are read back once, after the loop, so no step waits on the GPU."""

    def __init__(self, xp, total: int, stage: str = "latents"):
        self.xp, self.total, self.stage = xp, total, stage
        self.sums: list = []

    def __call__(self, latents, step: int) -> None:
        if self.xp is np:
            check_finite(latents, self.stage, step, self.total)
        else:
            self.sums.append(self.xp.sum(latents, dtype=self.xp.float64))

    def finish(self) -> None:
        if not self.sums:
            return
        values = to_host(self.xp.stack(self.sums))
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise NumericsError(_message(self.stage, int(bad[0]) + 1, self.total))
