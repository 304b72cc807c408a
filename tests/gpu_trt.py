"""Which TensorRT flavour the GPU tests can run here, or why none: one probe for every TensorRT GPU test."""

from __future__ import annotations

import importlib.util

from sdrt.backends.cuda import CudaError, gpu_info


def trt_gpu_backend() -> tuple[str | None, str]:
    """("tensorrt" or "tensorrt-rtx", "") when an NVIDIA GPU and that package are here, else (None, why not)."""
    try:
        gpu = gpu_info()
    except CudaError as exc:
        return None, f"needs an NVIDIA GPU with CUDA ({exc})"
    for backend, module in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")):
        if importlib.util.find_spec(module):
            return backend, ""
    return None, f"needs tensorrt or tensorrt_rtx installed (pip install tensorrt); {gpu.name} has neither"
