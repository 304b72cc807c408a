"""Reading LoRA files (kohya/A1111 and diffusers/peft safetensors) into their modules, in numpy, and the LoRA
errors; ``sdrt.lora`` turns the modules into weight deltas and re-exports these names.

Formats. kohya/A1111: ``lora_unet_<module>`` / ``lora_te_`` (``lora_te1_``) / ``lora_te2_`` + ``.lora_down.weight``,
``.lora_up.weight``, ``.alpha``; module paths with ``_`` for ``.`` in diffusers names, or (SDXL) in the sgm/LDM UNet's
names (``input_blocks_4_1_...``), mapped as diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` does. diffusers/peft:
``unet.<module>.lora_A.weight`` / ``lora_B`` (also ``lora.down``/``lora.up``), ``text_encoder.``, ``text_encoder_2.``;
alpha from a ``.alpha`` key or the ``lora_adapter_metadata`` that ``save_lora_weights`` writes (``lora_alpha``,
``alpha_pattern``), else rank. DoRA, LoHa and LoKr are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.errors import InputError

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
PEFT_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                 (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))


class LoraError(InputError):
    """A LoRA request sdrt cannot honour (the CLI prints one line and exits 2)."""


class LoraFileError(LoraError):
    """A LoRA file is missing, unreadable, not safetensors, or in an unsupported format."""


class LoraMismatchError(LoraError):
    """A LoRA does not fit this model: no key matches, rank or shape mismatch, another model family."""


@dataclass(frozen=True)
class Module:
    component: str
    key: str  # the module path as the file names it (for messages and resolution)
    down: np.ndarray
    up: np.ndarray
    alpha: float | None
    sgm: bool = False  # kohya key in the sgm/LDM UNet layout (SDXL)


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    addnet_hash: str  # A1111's ``Lora hashes`` hash: sha256 of the tensor data after the header
    format: str  # kohya | peft
    modules: tuple

    @property
    def name(self) -> str:
        return self.path.stem


_CACHE: dict = {}
CACHE_FILES = 4  # parsed files kept (each holds its tensors): a set of a few LoRAs is read once per change


def read_lora(path) -> LoraFile:
    """Parse a LoRA safetensors file (cached by path, size and mtime; the oldest of ``CACHE_FILES`` dropped)."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError:
        raise LoraFileError(f"LoRA file {path} does not exist") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        while len(_CACHE) >= CACHE_FILES:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _read(path)
    return _CACHE[key]


def _read(path: Path) -> LoraFile:
    from safetensors import SafetensorError, safe_open

    try:
        data = path.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        with safe_open(str(path), framework="np") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError, TypeError) as exc:
        raise LoraFileError(f"cannot read LoRA {path}: {str(exc).splitlines()[0]} (expected a .safetensors "
                            "file; bf16 files are not supported)") from None
    sha = hashlib.sha256(data).hexdigest()
    addnet = hashlib.sha256(data[header:]).hexdigest()
    if not tensors:
        raise LoraFileError(f"LoRA {path} holds no tensors")
    unsupported = [k for k in tensors if any(s in k for s in ("dora_scale", "hada_", "lokr_", ".diff"))]
    if unsupported:
        raise LoraFileError(f"LoRA {path} is a DoRA/LyCORIS file ({unsupported[0]}); supported: plain LoRA")
    if all(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors):
        return LoraFile(path, sha, addnet, "kohya", tuple(_kohya(path, tensors)))
    return LoraFile(path, sha, addnet, "peft", tuple(_peft(path, tensors, metadata)))


def _f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _kohya(path, tensors: dict):
    for key in sorted(k for k in tensors if k.endswith(".lora_down.weight")):
        name = key[: -len(".lora_down.weight")]
        prefix = next(p for p in KOHYA_PREFIXES if name.startswith(p))
        if name + ".lora_up.weight" not in tensors:
            raise LoraFileError(f"LoRA {path}: {name} has lora_down but no lora_up")
        alpha = tensors.get(name + ".alpha")
        module = name[len(prefix):]
        yield Module(KOHYA_PREFIXES[prefix], module, _f32(tensors[key]), _f32(tensors[name + ".lora_up.weight"]),
                     None if alpha is None else float(np.asarray(alpha, np.float64).reshape(-1)[0]),
                     sgm=module.startswith(("input_blocks_", "middle_block_", "output_blocks_", "label_emb_")))


def _peft(path, tensors: dict, metadata: dict):
    try:
        adapter = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        adapter = {}
    found = False
    for down_suffix, up_suffix in PEFT_SUFFIXES:
        for key in sorted(k for k in tensors if k.endswith(down_suffix)):
            found = True
            name = key[: -len(down_suffix)]
            component, _, module = name.partition(".")
            if component not in LORA_COMPONENTS or not module:
                raise LoraFileError(f"LoRA {path}: key {key} names no unet/text_encoder/text_encoder_2 module")
            if name + up_suffix not in tensors:
                raise LoraFileError(f"LoRA {path}: {name} has {down_suffix} but no {up_suffix}")
            alpha = tensors.get(name + ".alpha")
            alpha = float(np.asarray(alpha).reshape(-1)[0]) if alpha is not None else _meta_alpha(adapter, component,
                                                                                                  module)
            yield Module(component, module, _f32(tensors[key]), _f32(tensors[name + up_suffix]), alpha)
    if not found:
        raise LoraFileError(f"{path} is not a LoRA: no lora_down/lora_up or lora_A/lora_B keys (first key: "
                            f"{next(iter(tensors))})")


def _meta_alpha(adapter: dict, component: str, module: str) -> float | None:
    """peft's alpha for ``module``: ``alpha_pattern`` (a key equal to the module path or a suffix of it), else
    ``lora_alpha`` (scaled by ``rank_pattern``/r in ``delta``); None: alpha = rank (diffusers' default)."""
    for pattern, alpha in (adapter.get(f"{component}.alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    value = adapter.get(f"{component}.lora_alpha")
    return None if value is None else float(value)
