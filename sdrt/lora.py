"""LoRA files (kohya/A1111 and diffusers/peft safetensors) -> per-parameter weight deltas, in numpy.

Shared by the export-time merge (``sdrt_export.lora``) and run-time LoRA (``sdrt.lora_runtime``). The effective
weight is diffusers' ``fuse_lora(lora_scale=w)`` (peft ``LoraLayer.get_delta_weight``):
``W + w · (alpha / rank) · up @ down``; 1×1 convolutions as matrices, 3×3 ones as ``up ∘ down`` (peft's
``conv2d(A.permute(1,0,2,3), B)``); alpha missing means alpha = rank. Reading the files (formats, errors,
cache): ``sdrt.lora_files``, whose names are re-exported here.

Weight map (written by ``sdrt export`` for unet, text_encoder, text_encoder_2 and unet_control; read here and by
TensorRT refit):
``manifest.components[C].weight_map`` is the file record (path, sha256, size) of ``C.weights.json`` beside the
ONNX: a JSON object mapping each torch parameter name of the diffusers/transformers model (``state_dict`` names:
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``, ``text_model.encoder.layers.0.mlp.fc1.weight``;
every Linear and Conv2d weight) to ``{"initializer": ONNX name, "transpose": bool (ONNX holds W.T, as the exporter's
MatMul weights), "shape": ONNX shape, "dtype": numpy dtype of the initializer, "file": file holding its bytes,
"offset": byte offset there}``. Found by content (TensorRT demo's ``export_weights_map``), one-to-one by
construction; a weight whose content is found twice or not at all is left out (logged at export), and a LoRA on
it is refused. fp16 exports map to their fp16 (or fp32-island) initializers: run-time merges happen in fp32 and
are cast back. Graphs that ``build-engines --backend ort-*`` optimized are not covered by the map (ONNX Runtime
fuses and re-lays out weights there): with run-time LoRA the ort backends open the exported ONNX instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from sdrt.lora_files import KOHYA_PREFIXES, LORA_COMPONENTS, PEFT_SUFFIXES, LoraError, LoraFile, \
    LoraFileError, LoraMismatchError, Module, read_lora  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

DELTA_SOURCE = {"unet_control": "unet"}  # components that take another's deltas (ControlNet's UNet: the UNet's)
MAPPED_COMPONENTS = LORA_COMPONENTS + tuple(DELTA_SOURCE)  # components with a weight map
TAG = re.compile(r"<lora:([^>]*)>")  # A1111's extra-network syntax <lora:NAME[:WEIGHT]>


def check_weight(weight) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise LoraError(f"LoRA weight {weight!r} is not a number") from None
    if isinstance(weight, bool) or not math.isfinite(value):
        raise LoraError(f"LoRA weight {weight!r} is not a finite number")
    return value


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` (CLI ``--lora``) -> (path, weight); an existing path containing ``:`` is taken whole."""
    if ":" in text and not Path(text).exists():
        path, weight = text.rsplit(":", 1)
        return path, check_weight(weight)
    return text, 1.0


def delta(module: Module, weight: float, shape: tuple) -> np.ndarray:
    """``weight · (alpha / rank) · up @ down`` in the torch parameter's layout ``shape`` (float32)."""
    down, up = module.down, module.up
    rank = down.shape[0]
    where = f"{module.component} {module.key}"
    if up.ndim != down.ndim or up.shape[1] != rank or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise LoraMismatchError(f"LoRA rank mismatch at {where}: down {list(down.shape)}, up {list(up.shape)}")
    out = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    full = (up.shape[0],) + tuple(down.shape[1:])
    if tuple(shape) != full and not (len(shape) == 4 and shape[2:] == (1, 1) and full == tuple(shape[:2])):
        raise LoraMismatchError(f"LoRA shape mismatch at {where}: the LoRA makes {list(full)}, the model's weight is "
                                f"{list(shape)} (a LoRA for another model or family?)")
    scale = np.float32(weight * (rank if module.alpha is None else module.alpha) / rank)
    return (out * scale).reshape(shape)


def _flat(name: str) -> str:
    """The lookup form of a module path: ``_`` for ``.``, without CLIPTextModel's ``text_model`` level (transformers
    5 dropped it from the state_dict names that LoRA files still carry)."""
    flat = name.replace(".", "_")
    return flat[len("text_model_"):] if flat.startswith("text_model_") else flat


def _sgm_to_diffusers(key: str, layers: int) -> str:
    """kohya's sgm/LDM SDXL UNet module path (underscored) -> the diffusers one (underscored), as diffusers'
    ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key`` do."""
    for old, new in (("input_blocks_0_0", "conv_in"), ("out_2", "conv_out"),
                     ("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"),
                     ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2")):
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split("_")
    kind, index = "_".join(parts[:2]), int(parts[2])
    blocks = ["resnets", "attentions", "upsamplers"]
    if kind == "middle_block":
        head, rest = ["mid_block"] + [["resnets", "0"], ["attentions", "0"], ["resnets", "1"]][index], parts[3:]
    elif kind == "input_blocks":
        inner, rest = int(parts[3]), parts[4:]
        head = ["down_blocks", str((index - 1) // (layers + 1))]
        head += ["downsamplers", "0"] if "op" in rest else [blocks[inner], str((index - 1) % (layers + 1))]
    else:
        inner, rest = int(parts[3]), parts[4:]
        head = ["up_blocks", str(index // (layers + 1)), blocks[inner],
                str(index % (layers + 1)) if inner < 2 else "0"]
    name = "_".join(head + rest)
    for old, new in (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
                     ("skip_connection", "conv_shortcut"), ("downsamplers_0_op", "downsamplers_0_conv")):
        name = name.replace(old, new)
    return name


def resolve(lora: LoraFile, weight: float, targets: dict, family: str = "") -> dict:
    """``targets``: component -> {torch parameter name: torch shape} of this model. Returns component ->
    {parameter name: delta (float32)}; raises ``LoraMismatchError`` when nothing matches or a shape differs."""
    weight = check_weight(weight)
    if any(m.component == "text_encoder_2" for m in lora.modules) and "text_encoder_2" not in targets:
        raise LoraMismatchError(f"LoRA {lora.path.name} is an SDXL LoRA (it adapts text_encoder_2); this artifact "
                                f"is {family or 'a one-text-encoder model'}")
    if any(m.sgm for m in lora.modules) and "text_encoder_2" not in targets:
        raise LoraMismatchError(f"LoRA {lora.path.name} is an SDXL LoRA (kohya sgm UNet keys such as "
                                f"{next(m.key for m in lora.modules if m.sgm)}); this artifact is "
                                f"{family or 'not SDXL'}")
    lookup = {c: {_flat(p[: -len('.weight')]): p for p in names if p.endswith(".weight")}
              for c, names in targets.items()}
    layers = 1 + max((int(p.split(".")[3]) for p in targets.get("unet", {}) if p.startswith("down_blocks.0.resnets.")),
                     default=1)
    out, unmatched = {}, []
    for module in lora.modules:
        try:
            key = _sgm_to_diffusers(module.key, layers) if module.sgm else module.key
        except (ValueError, IndexError):
            key = module.key
        param = lookup.get(module.component, {}).get(_flat(key))
        if param is None:
            unmatched.append(f"{module.component}.{module.key}")
            continue
        change = delta(module, weight, tuple(targets[module.component][param]))
        deltas = out.setdefault(module.component, {})
        deltas[param] = deltas[param] + change if param in deltas else change
    if not out:
        raise LoraMismatchError(f"LoRA {lora.path.name}: no key matches this model ({family or 'artifact'}), e.g. "
                                f"{', '.join(unmatched[:3])}")
    if unmatched:
        log.warning("LoRA %s: %d of %d modules match nothing in this model and are ignored, e.g. %s",
                    lora.path.name, len(unmatched), len(lora.modules), ", ".join(unmatched[:3]))
    return out


def combine(loras, targets: dict, family: str = "") -> dict:
    """Several (path, weight) pairs -> component -> {parameter: summed delta}, applied in the given order."""
    total: dict = {}
    for path, weight in loras:
        for component, deltas in resolve(read_lora(path), weight, targets, family).items():
            into = total.setdefault(component, {})
            for param, change in deltas.items():
                into[param] = into[param] + change if param in into else change
    return total


def extract_tags(prompt: str, lora_dir=None) -> tuple[str, list]:
    """A1111's ``<lora:NAME[:WEIGHT]>`` tags: removed from the prompt, resolved to ``lora_dir/NAME.safetensors``
    (or a file of that stem below it). Returns (prompt without tags, [(path, weight), ...])."""
    found = []
    for body in TAG.findall(prompt):
        items = body.split(":")
        if len(items) > 2 or not items[0]:
            raise LoraError(f"prompt tag <lora:{body}>: expected <lora:NAME> or <lora:NAME:WEIGHT>")
        weight = check_weight(items[1]) if len(items) == 2 else 1.0
        if lora_dir is None:
            raise LoraError(f"prompt tag <lora:{body}> needs a LoRA folder (--lora-dir DIR, Python lora_dir=)")
        folder = Path(lora_dir).expanduser()
        path = folder / f"{items[0]}.safetensors"
        if not path.is_file():
            matches = sorted(folder.rglob(f"{items[0]}.safetensors")) if folder.is_dir() else []
            if not matches:
                raise LoraFileError(f"prompt tag <lora:{body}>: no {items[0]}.safetensors in {folder}")
            path = matches[0]
        found.append((str(path), weight))
    return TAG.sub("", prompt), found


def lora_parameters(active) -> dict:
    """``Result.parameters``' ``loras`` for the run-time set in use: [{name, path, weight, sha256}] ({} without)."""
    return {"loras": [{"name": read_lora(p).name, "path": p, "weight": w, "sha256": read_lora(p).sha256}
                      for p, w in active]} if active else {}


def cli_request(args) -> dict:
    """The pipeline keywords for ``--lora FILE[:WEIGHT]`` (repeatable) and ``--lora-dir DIR`` ({} without)."""
    out = {}
    pairs = [parse_lora_arg(text) for text in getattr(args, "lora", None) or []]
    if pairs:
        out["loras"] = pairs
    if getattr(args, "lora_dir", None):
        out["lora_dir"] = args.lora_dir
    return out


def infotext(prompt: str, parameters: dict) -> tuple[str, dict]:
    """A1111's PNG text for the LoRAs of ``parameters``: the prompt with a ``<lora:NAME:W>`` tag for each LoRA
    not already tagged in it, and ``Lora hashes: "name: hash12, ..."`` (A1111's addnet hash, 12 hex digits)."""
    used = parameters.get("loras") or []
    if not used:
        return prompt, {}
    tagged = {body.split(":")[0] for body in TAG.findall(prompt)}
    tags = "".join(f" <lora:{e['name']}:{e['weight']:g}>" for e in used if e["name"] not in tagged)
    hashes = ", ".join(f"{e['name']}: {read_lora(e['path']).addnet_hash[:12]}" for e in used)
    return prompt + tags, {"Lora hashes": json.dumps(hashes)}


def load_weight_map(manifest, component: str) -> dict:
    """The weight map of ``component`` (see the module docstring), after checking it against its sha256."""
    record = manifest.component(component).get("weight_map")
    if not record:
        raise LoraError(f"{manifest.root} has no weight map for {component} (exported by an older sdrt); re-export "
                        "it with this sdrt for run-time LoRA, or merge the LoRA at export (sdrt export --lora)")
    manifest.check_file(record)
    return json.loads((manifest.root / record["path"]).read_text())
