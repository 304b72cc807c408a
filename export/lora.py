"""``sdrt export --lora FILE[:WEIGHT]``: LoRAs merged into the torch weights before tracing.

The deltas are ``sdrt.lora``'s (the numpy math run-time LoRA uses too), added to the fp32 torch weights in the
order given, so an export-time merge equals diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=w)`` and a
run-time LoRA on a plain export of the same model. The manifest records each file's sha256 and weight.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdrt.lora import DELTA_SOURCE, LORA_COMPONENTS, combine, parse_lora_arg, read_lora
from sdrt.specs import TEXT_ENCODER_2
from sdrt_export.weight_map import inner_model, lora_targets
from sdrt_export.wrappers import load_component

log = logging.getLogger(__name__)


def normalize(loras) -> list[tuple[str, float]]:
    """``["FILE[:WEIGHT]", (path, weight), ...]`` -> [(path, weight)], every file read (errors now, not later)."""
    pairs = []
    for item in loras or ():
        path, weight = parse_lora_arg(item) if isinstance(item, str) else (str(item[0]), float(item[1]))
        read_lora(path)
        pairs.append((path, weight))
    return pairs


def plan(model_dir: Path, dims, loras) -> tuple[dict, list[dict]]:
    """Resolve ``loras`` against the model's torch weights before any export: (component -> {parameter:
    delta}, the manifest's ``loras`` records)."""
    pairs = normalize(loras)
    if not pairs:
        return {}, []
    targets = {}
    for name in LORA_COMPONENTS:
        if name == TEXT_ENCODER_2 and not dims.has_text_encoder_2:
            continue
        weights = lora_targets(inner_model(load_component(model_dir, name)))
        targets[name] = {k: tuple(v.shape) for k, v in weights.items()}
    deltas = combine(pairs, targets, dims.family)
    records = []
    for path, weight in pairs:
        lora = read_lora(path)
        records.append({"name": lora.name, "path": str(Path(path).absolute()), "sha256": lora.sha256,
                        "addnet_hash": lora.addnet_hash, "format": lora.format, "weight": weight, "scale": weight})
    log.info("LoRAs %s merge into %s", ", ".join(r["name"] for r in records), ", ".join(sorted(deltas)))
    return deltas, records


def merge_into(wrapper: torch.nn.Module, deltas: dict) -> torch.nn.Module:
    """Add ``deltas`` ({parameter name: float32 array}) to the wrapped model's weights, in place."""
    params = dict(inner_model(wrapper).named_parameters())
    with torch.no_grad():
        for name, change in deltas.items():
            params[name].add_(torch.from_numpy(change).to(params[name].dtype))
    return wrapper


def merged_loader(load, model_dir: Path, deltas: dict, name: str):
    """``export_component``'s ``load`` for ``name`` with its LoRA deltas merged (``unet_control``, ControlNet's
    UNet, takes the UNet's); ``load`` itself when no LoRA touches ``name``."""
    changes = deltas.get(DELTA_SOURCE.get(name, name))
    if not changes:
        return load

    def merged(component: str) -> torch.nn.Module:
        return merge_into(load(component) if load else load_component(model_dir, component), changes)
    return merged


def fuse_reference(pipe, pairs) -> None:
    """diffusers' own LoRA path on a reference pipeline: ``load_lora_weights`` per file, ``set_adapters`` with the
    weights, ``fuse_lora`` (``lora_scale=w`` for one LoRA), then ``unload_lora_weights`` (fused weights stay)."""
    if not pairs:
        return
    names = [f"lora{i}" for i in range(len(pairs))]
    for name, (path, _) in zip(names, pairs):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(pairs) == 1:
        pipe.fuse_lora(adapter_names=names, lora_scale=pairs[0][1])
    else:
        pipe.set_adapters(names, adapter_weights=[w for _, w in pairs])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
