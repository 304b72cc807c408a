"""``sdrt build-engines --refit``: refittable TensorRT / TensorRT-RTX engines and their refit plan.

Run-time LoRA on TensorRT changes weights in a built engine instead of rebuilding it (TensorRT's ``Refitter``,
as in TensorRT's diffusion demo). Which weights a LoRA can change is the component's weight map
(``sdrt.lora``: torch parameter -> ONNX initializer); only those are marked refittable
(``INetworkDefinition.mark_weights_refittable`` + ``BuilderFlag.REFIT_INDIVIDUAL``), so TensorRT still folds
and fuses every other constant. The ONNX parser names each weight after its initializer, so a weight's
TensorRT name is its initializer's name; ``mark_weights_refittable`` answers False for an initializer the
parsed network holds no weights of (folded or consumed as a shape), and such an initializer is recorded
as not refittable (a LoRA on it is refused at run time).

The plan, ``<backend>/<component>.refit.json`` beside the engine and listed with its sha256 in the engine
record: ``{"format": 1, "component", "backend", "flag", "onnx_sha256", "weight_map_sha256",
"weights": {initializer: {"trt_name", "shape", "dtype", "file", "offset", "params": [torch names]}},
"not_refittable": {initializer: why}}``; ``file``/``offset`` say where the base bytes lie (relative to the
ONNX folder), so the runtime (``sdrt.backends.refit``) restores base weights without onnx.
Components without a weight map (the VAE) are built as plain engines.
"""

from __future__ import annotations

import ctypes
import json
import logging
from sdrt.errors import ArtifactError, InputError
from sdrt.manifest import Manifest, write_json_atomic

log = logging.getLogger(__name__)

PLAN_FORMAT = 1
PLAN_SUFFIX = ".refit.json"
FLAG = "REFIT_INDIVIDUAL"
CUDA_HINT = ("{label} {version} needs the CUDA driver (libcuda.so.1) to build refittable engines and this "
             "machine has none; build with --refit where an NVIDIA driver is installed, or without --refit "
             "(then run-time LoRA needs `sdrt export --lora`)")


def check_request(backend: str, trt_backends: tuple) -> None:
    if backend not in trt_backends:
        raise InputError(f"--refit is for --backend {' or '.join(trt_backends)} (ONNX Runtime backends take "
                         "run-time LoRA weights when a session is created; nothing to refit)")


def weight_map(manifest: Manifest, component: str) -> tuple[dict, str] | None:
    """(the component's weight map, its sha256) after checking the file, or None when it has none."""
    record = manifest.component(component).get("weight_map")
    if not record:
        return None
    manifest.check_file(record)
    data = json.loads((manifest.root / record["path"]).read_text())
    if not isinstance(data, dict) or not all(isinstance(e, dict) and "initializer" in e for e in data.values()):
        raise ArtifactError(f"{manifest.root / record['path']} is not a weight map; re-run `sdrt export --force`")
    return data, record["sha256"]


def targets(manifest: Manifest, component: str) -> dict | None:
    """ONNX initializer -> what the plan keeps of it (shape, dtype, where its bytes lie, its torch names);
    None for a component without a weight map."""
    found = weight_map(manifest, component)
    if found is None:
        return None
    out: dict[str, dict] = {}
    for param, entry in sorted(found[0].items()):
        item = out.setdefault(entry["initializer"], {
            "trt_name": entry["initializer"], "shape": list(entry["shape"]), "dtype": entry.get("dtype", "float32"),
            "file": entry.get("file"), "offset": entry.get("offset"), "params": []})
        item["params"].append(param)
    return out


def require_weight_maps(manifest: Manifest, components) -> None:
    if not any(manifest.component(c).get("weight_map") for c in components):
        raise ArtifactError(f"{manifest.root} has no weight maps (exported by an sdrt without run-time LoRA); "
                            "re-export it with `sdrt export --force`, then build with --refit")


def wanted(manifest: Manifest, component: str, refit: bool) -> dict | None:
    """The engine record's ``refit`` field this request needs (None: a plain engine)."""
    if not refit:
        return None
    record = manifest.component(component).get("weight_map")
    return {"flag": FLAG, "weight_map_sha256": record["sha256"]} if record else None


def mark(trt, network, config, initializers) -> tuple[list[str], list[str]]:
    """Mark the weights of ``initializers`` refittable and set ``REFIT_INDIVIDUAL``;
    return (marked, names the network holds no weights of)."""
    marked, unknown = [], []
    for name in initializers:
        (marked if network.mark_weights_refittable(name) else unknown).append(name)
    config.set_flag(getattr(trt.BuilderFlag, FLAG))
    return marked, unknown


def plan(manifest: Manifest, backend: str, component: str, weights: dict, marked, unknown) -> dict:
    """The refit plan of one built engine (see the module docstring)."""
    if unknown:
        log.warning("%s: %d weight-map initializers have no weights in the TensorRT network and cannot be refitted "
                    "(a LoRA on them is refused), e.g. %s", component, len(unknown), ", ".join(unknown[:3]))
    return {"format": PLAN_FORMAT, "component": component, "backend": backend, "flag": FLAG,
            "onnx_sha256": manifest.onnx_digest(component),
            "weight_map_sha256": manifest.component(component)["weight_map"]["sha256"],
            "weights": {name: weights[name] for name in marked},
            "not_refittable": {name: "no weights of this name in the parsed TensorRT network" for name in unknown}}


def save(manifest: Manifest, backend: str, component: str, weights: dict, fields: dict) -> str:
    """Write the plan of a just-built engine from ``build_engine``'s fields (whose ``refit_marked`` and
    ``refit_unknown`` become counts); return its path relative to ENGINE_DIR."""
    data = plan(manifest, backend, component, weights, fields.pop("refit_marked"), fields.pop("refit_unknown"))
    fields["refit_weights"], fields["refit_not_refittable"] = len(data["weights"]), len(data["not_refittable"])
    relpath = f"{backend}/{component}{PLAN_SUFFIX}"
    write_json_atomic(manifest.root / relpath, data)
    return relpath


def has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def build_hint(label: str, version: str) -> str:
    """Why a refittable build failed when it did so without a CUDA driver (TensorRT-RTX 1.7 loads
    libcuda.so.1 for refittable builds, and fails without it, where plain builds need no GPU)."""
    return "" if has_cuda_driver() else " (" + CUDA_HINT.format(label=label, version=version) + ")"
