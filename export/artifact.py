"""What an export writes besides its graphs: the Stable Diffusion manifest (``manifest.json``, read by
``sdrt.manifest``), the library versions it records, and the steps shared with the Kandinsky exporter
(the model's scheduler checked early, hub progress bars silenced, file modes)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import sdrt
from sdrt.errors import SdrtError
from sdrt.manifest import FORMAT_VERSION
from sdrt_export import controlnet, ort_optimize, tiny_vae
from sdrt_export.folders import hash_folder

log = logging.getLogger(__name__)


def sd_manifest(work: Path, specs, components: dict, record, *, model_dir: Path, dims, sizes, precision: str,
                opset: int, exporter: str, read: dict, force_upcast: bool, tokenizers: dict, tiny, controls,
                lora_records: list, timings: dict, start: float) -> dict:
    """The manifest of an SD export in ``work``: ``components`` (name -> export result), ``record(work, rel)``
    the file record of one file, ``read`` the model folder's scheduler / model_index / VAE configs (read
    before the export began), ``tokenizers`` the manifest's tokenizer sections."""
    hashed = time.perf_counter()
    source_sha = hash_folder(model_dir)
    sections = {"tiny_vae": tiny_vae.manifest_section(*tiny, hash_folder(tiny[0]))} if tiny else {}
    if controls:
        sections["controlnets"] = controlnet.manifest_section(controls, hash_folder)
    timings["source_hash"] = round(time.perf_counter() - hashed, 2)
    index, vae_config = read["index"], read["vae"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "sdrt_version": sdrt.__version__,
        "family": dims.family,
        "source": {"path": str(model_dir.absolute()), "sha256": source_sha},
        "dims": dims.to_dict(),
        "sizes": sizes.to_dict(),
        "precision": precision,
        "opset": opset,
        "exporter": exporter,
        "versions": versions(),
        "components": {
            spec.name: {
                "files": [record(work, name) for name in components[spec.name]["files"]],
                "format": "onnx",
                "precision": components[spec.name]["precision"],
                **components[spec.name]["extra"],
                "inputs": spec.input_names,
                "outputs": spec.output_names,
                "profile": spec.profile(sizes),
                "check_error": components[spec.name]["check_error"],
            }
            for spec in specs
        },
        "scheduler": read["scheduler"],
        **tokenizers,
        "pipeline": {"class_name": index.get("_class_name"), "force_zeros_for_empty_prompt":
                     dims.has_text_encoder_2 and bool(index.get("force_zeros_for_empty_prompt", True))},
        # force_upcast: the SDXL pipelines run this VAE in fp32 (it overflows in fp16)
        "vae": {"scaling_factor": float(vae_config.get("scaling_factor") or 0.18215),
                "shift_factor": vae_config.get("shift_factor"),
                "force_upcast": force_upcast},
        **sections,
        "loras": lora_records,  # merged at export: name, path, sha256, weight
        "timings": {**timings, "total": round(time.perf_counter() - start, 2)},
    }
    # CPU-native graphs of the fp32 components, for a fast ort-cpu load (ort_native.py)
    manifest.update(ort_optimize.engines_section(work, components, manifest["components"], record))
    return manifest


def check_scheduler(config: dict) -> None:
    """Say at export, not at the first generation, when sdrt cannot run the model's own scheduler config
    (an unimplemented key, an unknown class); generating with ``--scheduler NAME`` still works then."""
    from sdrt import schedulers

    try:
        schedulers.from_config(config)
    except SdrtError as exc:
        log.warning("the model's scheduler_config.json will be refused at run time (%s); generate with "
                    "--scheduler NAME, e.g. 'Euler a' or 'DPM++ 2M Karras'", exc)


def set_modes(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the artifact the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def quiet_hub_progress() -> None:
    """Our own tqdm bar is the progress display; silence the 'Loading weights' bars."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def versions() -> dict:
    """The build-side library versions an artifact records."""
    import diffusers
    import onnx
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__}
