"""Inputs and comparisons for the export check: ONNX Runtime (CPU) vs the torch module.

The exporter checks every component at two shapes inside the artifact's size range (batch 1
non-square, batch 2 square) and traces at a third (see ``trace_point``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdrt.specs import ComponentSpec, SizeRange
from sdrt_export.wrappers import CLIP_EOS_ID


def check_points(sizes: SizeRange, spec: ComponentSpec) -> list[tuple[int, int, int]]:
    """Two (batch, height, width) in the range: batch 1 non-square, batch 2 square (a multiple of 64)."""
    lo, hi = sizes.min_size, sizes.max_size
    wide = min(lo + 3 * spec.scale, hi)
    square = min(-(-lo // 64) * 64, hi)
    batch2 = min(2, sizes.max_batch * spec.batch_factor)
    return [(1, lo, wide), (batch2, square, square)]


def trace_point(sizes: SizeRange, spec: ComponentSpec, up_factor: int) -> tuple[int, int, int]:
    """Batch 2, non-square, latent sides not divisible by the UNet's down-sampling factor (see top)."""
    step = spec.scale
    height = sizes.min_size + step
    while up_factor > 1 and (height // step) % up_factor == 0:
        height += step
    return 2, height, height + 2 * step


def random_inputs(spec: ComponentSpec, batch: int, height: int, width: int, rng: np.random.Generator):
    arrays = []
    for t in spec.inputs:
        shape = t.shape(batch, height, width, spec.scale)
        if np.dtype(t.dtype).kind in "iu":  # token ids: random, each row holds an EOS (CLIP pools there)
            ids = rng.integers(0, CLIP_EOS_ID - 1, size=shape)
            for row in ids.reshape(-1, shape[-1]):
                row[0], row[rng.integers(1, shape[-1])] = CLIP_EOS_ID - 1, CLIP_EOS_ID
            arrays.append(ids.astype(t.dtype))
        elif t.name == "timestep":
            arrays.append(rng.uniform(0, 1000, size=shape).astype(t.dtype))
        elif t.name == "images":
            arrays.append(rng.uniform(-1, 1, size=shape).astype(t.dtype))
        else:
            arrays.append(rng.standard_normal(size=shape).astype(t.dtype))
    return arrays


def run_torch(module: torch.nn.Module, arrays) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    out = out if isinstance(out, tuple) else (out,)
    return [o.detach().float().numpy() for o in out]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    denom = float(np.linalg.norm(want.astype(np.float64)))
    diff = float(np.linalg.norm(got.astype(np.float64) - want.astype(np.float64)))
    return diff / denom if denom else diff


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
