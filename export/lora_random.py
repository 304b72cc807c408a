"""Random, non-zero LoRA files for a diffusers pipeline folder (tests and demos), in kohya or diffusers/peft format.

Targets what both loaders adapt: attention ``to_q/to_k/to_v/to_out.0``, ``proj_in`` / ``proj_out`` (1×1
convolutions or Linear), resnet ``conv1`` (3×3) and ``conv_shortcut`` (1×1), ``ff.net.0.proj``, ``time_emb_proj``;
CLIP ``q/k/v/out_proj`` and ``mlp.fc1``. ``up`` is random too (a trained-from-zero LoRA's fresh ``up`` is zero and
would change nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "proj_in", "proj_out", "conv1", "conv_shortcut", "ff.net.0.proj", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1")


def _modules(model: torch.nn.Module, suffixes) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and name.endswith(tuple(suffixes))}


def _pair(module: torch.nn.Module, rank: int, rng, scale: float):
    """(down, up) for ``module``: down [r, in(, kh, kw)], up [out, r(, 1, 1)], std ``scale``/√fan-in."""
    weight = module.weight
    fan_in = int(np.prod(weight.shape[1:]))
    down_shape = (rank,) + tuple(weight.shape[1:])
    up_shape = (weight.shape[0], rank) + ((1, 1) if weight.ndim == 4 else ())
    down = rng.standard_normal(down_shape).astype(np.float32) * np.float32(1 / np.sqrt(fan_in))
    up = rng.standard_normal(up_shape).astype(np.float32) * np.float32(scale / np.sqrt(rank))
    return down, up


def write_random_lora(model_dir, out, fmt: str = "kohya", components=("unet",), rank: int = 4, alpha=None,
                      seed: int = 0, scale: float = 0.5) -> Path:
    """Write ``out`` (.safetensors) adapting ``components`` (unet, text_encoder, text_encoder_2) of the pipeline
    in ``model_dir``; ``alpha`` None: no alpha stored (alpha = rank)."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    rng = np.random.default_rng(seed)
    model_dir, tensors, metadata = Path(model_dir), {}, {}
    kohya = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if "text_encoder_2" in components else "lora_te_",
             "text_encoder_2": "lora_te2_"}
    for component in components:
        if component == "unet":
            model, targets = UNet2DConditionModel.from_pretrained(model_dir / "unet"), UNET_TARGETS
        else:
            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            model, targets = cls.from_pretrained(model_dir / component), TEXT_TARGETS
        for name, module in sorted(_modules(model, targets).items()):
            down, up = _pair(module, rank, rng, scale)
            if component != "unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # as LoRA files name CLIP modules (transformers < 5 layout)
            if fmt == "kohya":
                key = kohya[component] + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                if alpha is not None:
                    tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
            elif fmt == "peft":
                tensors[f"{component}.{name}.lora_A.weight"], tensors[f"{component}.{name}.lora_B.weight"] = down, up
            else:
                raise ValueError(f"format {fmt!r}: kohya or peft")
        if fmt == "peft":
            metadata.update({f"{component}.r": rank, f"{component}.lora_alpha": rank if alpha is None else alpha,
                             f"{component}.target_modules": sorted(_modules(model, targets))})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"lora_adapter_metadata": json.dumps(metadata)} if metadata else None)
    return out
