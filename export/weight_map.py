"""The weight map: torch parameter name -> the ONNX initializer it became (format: ``sdrt.lora``'s docstring).

The legacy exporter renames and pre-transposes Linear weights (``onnx::MatMul_1533`` holds ``W.T``), so names
say nothing; as TensorRT's demo (``base_model.py:export_weights_map``) the map is found by content: every
initializer's bytes are hashed, and every Linear/Conv2d weight of the torch module is looked up by the hash of
``W`` and of ``W.T``, in fp32 and as the fp16 converter casts it. A weight found at more than one initializer
(or sharing one with another weight), or found nowhere, is left out and logged: the map is one-to-one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from sdrt.lora import MAPPED_COMPONENTS
from sdrt.manifest import file_record
from sdrt.onnx_weights import initializer_locations

log = logging.getLogger(__name__)

SUFFIX = ".weights.json"


def inner_model(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The diffusers/transformers model inside an export wrapper (its ``state_dict`` names are the map's keys)."""
    return getattr(wrapper, "unet", None) or getattr(wrapper, "text_encoder", None) or wrapper


def lora_targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear and Conv2d weight: what a LoRA can adapt."""
    return {f"{name}.weight": module.weight.detach() for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _fp16(array: np.ndarray) -> np.ndarray:
    """fp16 as ``onnxruntime.transformers.float16`` converts initializers (with its clamping)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return convert_np_to_float16(array)


def build(onnx_path: Path, weights: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """(map, left-out parameter names) for the ONNX file ``onnx_path`` and torch ``weights``."""
    locations = initializer_locations(onnx_path)
    folder = onnx_path.parent
    by_hash: dict[str, list[str]] = {}
    for name, loc in locations.items():
        if loc.dtype in ("float32", "float16") and len(loc.shape) >= 2:
            by_hash.setdefault(_digest(loc.read(folder)), []).append(name)
    # only the layouts and casts some initializer could hold are hashed: an fp32 graph has no fp16 copy to find,
    # and a weight whose transposed shape no initializer has was not transposed (SDXL's UNet: 10 GB of weights)
    shapes = {tuple(loc.shape) for loc in locations.values()}
    dtypes = {loc.dtype for loc in locations.values()}
    found: dict[str, list[tuple[str, bool]]] = {}
    for param, tensor in weights.items():
        array = tensor.float().numpy()
        hits = set()
        for transpose in ((False, True) if array.ndim == 2 else (False,)):
            candidate = array.T if transpose else array
            if tuple(candidate.shape) not in shapes:
                continue
            casts = ([candidate] if "float32" in dtypes else []) + ([_fp16(candidate)] if "float16" in dtypes else [])
            for cast in casts:
                hits.update((init, transpose) for init in by_hash.get(_digest(cast), ())
                            if locations[init].shape == candidate.shape)
        found[param] = sorted(hits)
    claims: dict[str, int] = {}
    for hits in found.values():
        for init, _ in hits:
            claims[init] = claims.get(init, 0) + 1
    mapping, left_out = {}, []
    for param, hits in found.items():
        if len(hits) != 1 or claims[hits[0][0]] != 1:
            left_out.append(param)
            continue
        init, transpose = hits[0]
        loc = locations[init]
        mapping[param] = {"initializer": init, "transpose": transpose, "shape": list(loc.shape), "dtype": loc.dtype,
                          "file": loc.file, "offset": loc.offset}
    assert len({e["initializer"] for e in mapping.values()}) == len(mapping)  # one-to-one
    return mapping, left_out


def write(work: Path, component: str, files: list[str], load) -> dict | None:
    """Write ``work/<component>.weights.json`` for the exported ``files``, ``load(component)`` giving the torch
    wrapper they were exported from; return its file record (None for components LoRA does not touch)."""
    if component not in MAPPED_COMPONENTS:
        return None
    weights = lora_targets(inner_model(load(component)))
    mapping, left_out = build(work / files[0], weights)
    if left_out:
        log.warning("%s: %d of %d weights not found once in the ONNX, left out of the weight map (no run-time LoRA "
                    "on them), e.g. %s", component, len(left_out), len(weights), ", ".join(left_out[:3]))
    name = f"{component}{SUFFIX}"
    (work / name).write_text(json.dumps(mapping, indent=1, sort_keys=True) + "\n")
    log.info("%s: weight map of %d weights (%d transposed)", component, len(mapping),
             sum(e["transpose"] for e in mapping.values()))
    return file_record(work, name)
