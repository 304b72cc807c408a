"""``sdrt export``: a diffusers Stable Diffusion folder -> ENGINE_DIR (ONNX components + manifest).

Each component is wrapped (``wrappers.py``) so its forward signature is exactly its spec, exported
with dynamic batch/height/width, cleaned up (``graph.py``), checked against the torch module with
ONNX Runtime at two shapes, and recorded in ``manifest.json``. Everything is built in a temporary
sibling directory that is renamed into place at the end, so a failed or interrupted export never
leaves a partial ENGINE_DIR.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

import sdrt
from sdrt.errors import ExportError, InputError, ModelError, OutputExistsError, SdrtError
from sdrt.backends.ort_native import NATIVE
from sdrt.manifest import ENGINES_KEY, FORMAT_VERSION, MANIFEST_NAME, file_record, files_digest, load_manifest, \
    write_json_atomic
from sdrt.progress import progress_bar
from sdrt.specs import VAE_DECODER, VAE_ENCODER, ComponentSpec, SizeRange, build_specs
from sdrt_export import controlnet, fp16, graph, ort_optimize, tiny_vae, weight_map
from sdrt_export import lora as lora_export
from sdrt_export.checks import check_points, random_inputs, relative_error, run_torch, trace_point
from sdrt_export.folders import copy_tokenizer, hash_folder, make_temp_dir, move_into_place, validate_model_dir
from sdrt_export.wrappers import dims_from_model, load_component, read_json, \
    unet_up_factor

log = logging.getLogger(__name__)

# Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. On SD1.5 it exports the
# 3.4 GB UNet in 34 s vs 85 s for dynamo (tiny UNet: 1 s vs 36 s), with the same ORT parity (~1e-6);
# it takes plain ``dynamic_axes`` (dynamo's torch.export needs Dim constraints and guards on the
# UNet's "latent not divisible by 2**n -> pass upsample sizes" branch), and it writes >2 GB models with
# external data on its own. We trace at a latent size the UNet does NOT divide evenly, which makes the
# traced graph take upsample sizes from the skip connections, so it serves every multiple-of-8 size.
EXPORTER = "legacy"
DEFAULT_OPSET = 17  # LayerNormalization is native from 17; supported by ORT 1.31 and TensorRT >= 8.6
SUPPORTED_OPSETS = range(14, 21)  # 14: scaled_dot_product_attention; 20: newest the legacy exporter emits
# relative L2 error, ONNX Runtime vs torch, fp32: the per-stage bound of `sdrt verify`. Accumulation order alone
# (MLAS vs oneDNN) gives the full-size SD/SDXL VAE decoder 2.2e-5 at 512² (1e-5 refused it after a 38-min SDXL
# export); a wrong graph is off by 1e-2 or more
TOLERANCE = 1e-4


# --- one component -----------------------------------------------------------------------------------

def torch_export(module: torch.nn.Module, spec: ComponentSpec, arrays, path: Path, opset: int) -> None:
    """Export with the spec's names and dynamic axes (module level so tests can inject failures)."""
    dynamic_axes = {t.name: t.dynamic_axes for t in spec.tensors if t.dynamic_axes}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(a) for a in arrays), str(path), dynamo=False,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True)


def export_component(model_dir: Path, spec: ComponentSpec, work: Path, sizes: SizeRange, opset: int,
                     precision: str = "fp32", load=None) -> dict:
    """``load(name)``: the torch wrapper, for a component not in the pipeline folder (the tiny VAE)."""
    start = time.perf_counter()
    extra = {}
    rng = np.random.default_rng(0)
    up = unet_up_factor(model_dir)
    module = load(spec.name) if load else load_component(model_dir, spec.name)
    cases = [random_inputs(spec, *point, rng) for point in check_points(sizes, spec)]
    references = [run_torch(module, arrays) for arrays in cases]  # kept so torch can be freed first
    raw_dir = work / f".raw-{spec.name}"
    raw_dir.mkdir()
    try:
        try:
            torch_export(module, spec, random_inputs(spec, *trace_point(sizes, spec, up), rng),
                         raw_dir / f"{spec.name}.onnx", opset)
            del module
            gc.collect()
            exported = time.perf_counter()
            if precision == "fp16":  # clean the fp32 graph, then convert it (see fp16.py)
                clean = graph.clean_up(raw_dir / f"{spec.name}.onnx", raw_dir / "clean.onnx")
                files, extra = fp16.convert(raw_dir / clean[0], work / f"{spec.name}.onnx",
                                            fp16.islands_for(controlnet.island_policy(spec.name), model_dir))
            else:
                files = graph.clean_up(raw_dir / f"{spec.name}.onnx", work / f"{spec.name}.onnx")
            graph.check_model(work / files[0])
            # fp16: ORT CPU would hide fp16 overflow; check the emulated strongly typed graph instead
            native = None  # fp32: the check's session also writes the CPU-native graph (ort_optimize.py)
            session = fp16.emulated_session(work / files[0], raw_dir) if precision == "fp16" \
                else ort_optimize.check_session(work, spec.name, files)
            session, native = session if isinstance(session, tuple) else (session, None)
        finally:
            shutil.rmtree(raw_dir, ignore_errors=True)
        errors = []
        for arrays, want in zip(cases, references):
            got = session.run(spec.output_names, dict(zip(spec.input_names, arrays)))
            errors.append(max(relative_error(g, w) for g, w in zip(got, want)))
        del session
    except (SdrtError, OSError):
        raise
    except Exception as exc:  # torch / onnx / ORT failures: one line for the user, traceback in the log
        log.debug("%s export failed", spec.name, exc_info=True)
        raise ExportError(f"{spec.name}: export failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    gc.collect()
    error, tolerance = max(errors), fp16.FP16_TOLERANCE if precision == "fp16" else TOLERANCE
    if not error <= tolerance:
        raise ExportError(f"{spec.name}: ONNX Runtime ({precision}) differs from torch, relative L2 error "
                          f"{error:.3g} > {tolerance:g} (shapes {check_points(sizes, spec)})")
    seconds = time.perf_counter() - start
    log.info("%s: exported and checked in %.1f s (export %.1f s), relative L2 error %.2e",
             spec.name, seconds, exported - start, error)
    return {"files": files, "precision": precision, "seconds": round(seconds, 2), "check_error": error,
            "check_shapes": check_points(sizes, spec), "extra": extra, "native": native}


def component_precision(name: str, precision: str, force_upcast: bool) -> str:
    """The precision one component is exported in: fp16 exports keep the VAE in fp32 where diffusers' XL
    pipelines upcast it (``force_upcast``: the SDXL VAE overflows fp16 to black/NaN images)."""
    if precision == "fp16" and force_upcast and name in (VAE_DECODER, VAE_ENCODER):
        return "fp32"
    return precision


def _check_scheduler(config: dict) -> None:
    """Say at export, not at the first generation, when sdrt cannot run the model's own scheduler config
    (an unimplemented key, an unknown class); generating with ``--scheduler NAME`` still works then."""
    from sdrt import schedulers

    try:
        schedulers.from_config(config)
    except SdrtError as exc:
        log.warning("the model's scheduler_config.json will be refused at run time (%s); generate with "
                    "--scheduler NAME, e.g. 'Euler a' or 'DPM++ 2M Karras'", exc)


def export_model(model, out, sizes: SizeRange | None = None, opset: int | None = None, force: bool = False,
                 progress: bool = True, precision: str = "fp32", tiny_vae_dir=None, controlnet_dirs=(),
                 loras=None, prior=None) -> dict:
    """Export a diffusers SD pipeline folder to ENGINE_DIR ``out`` in ``precision`` (fp32, or fp16
    with fp32 islands), with the AutoencoderTiny in ``tiny_vae_dir`` too if given, and each ControlNet folder in
    ``controlnet_dirs`` (``controlnet.py``), with ``loras`` (``["FILE[:WEIGHT]" or (path, weight)]``, ``lora.py``)
    merged; return a JSON-able summary."""
    start = time.perf_counter()
    from sdrt_export.kandinsky_model import find_layout  # Kandinsky 2.2: prior + decoder, its own exporter

    if prior is not None or find_layout(model) is not None:
        if tiny_vae_dir is not None or controlnet_dirs:
            raise InputError("--tiny-vae and --controlnet are for Stable Diffusion models, not Kandinsky 2.2")
        from sdrt_export.kandinsky import export_kandinsky

        return export_kandinsky(model, out, prior=prior, sizes=sizes, opset=opset, force=force, progress=progress,
                                precision=precision)
    sizes = sizes or SizeRange()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset not in SUPPORTED_OPSETS:
        raise InputError(f"opset {opset} is not supported; use {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]}")
    if precision not in fp16.PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported; use {' or '.join(fp16.PRECISIONS)}")
    model_dir = validate_model_dir(model)
    dims = dims_from_model(model_dir)
    tiny = None
    if tiny_vae_dir is not None:  # TAESD's decoder and encoder become two more components
        tiny = tiny_vae.validate_tiny_vae_dir(tiny_vae_dir, dims)
        dims = replace(dims, tiny_vae_latent_channels=dims.latent_channels)
    controls = controlnet.validate_controlnet_dirs(controlnet_dirs, model_dir, dims) if controlnet_dirs else []
    if controls:  # one controlnet_<k> per folder, and unet_control (the UNet taking their residuals)
        dims = controlnet.with_controlnets(dims, model_dir, len(controls))
    # everything the manifest needs from the model folder is read now, not after minutes of export
    scheduler = read_json(model_dir / "scheduler" / "scheduler_config.json")
    _check_scheduler(scheduler)
    vae_config = read_json(model_dir / "vae" / "config.json")
    force_upcast = dims.has_text_encoder_2 and bool(vae_config.get("force_upcast", True))
    index = read_json(model_dir / "model_index.json")
    tokenizer_dir = model_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file() and not all(
            (tokenizer_dir / name).is_file() for name in ("vocab.json", "merges.txt")):
        raise ModelError(f"{tokenizer_dir} has neither tokenizer.json nor vocab.json + merges.txt")
    specs = build_specs(dims)
    out = Path(out).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; remove it first")

    _quiet_hub_progress()
    lora_deltas, lora_records = lora_export.plan(model_dir, dims, loras)  # LoRA errors before minutes of export
    work, created = None, []
    try:
        work = make_temp_dir(out, created)
        components, timings = {}, {}
        with progress_bar(list(specs), desc="export", unit="component", enabled=progress) as bar:
            for spec in bar:
                bar.set_postfix_str(spec.name)
                load = partial(tiny_vae.load_tiny_component, tiny[0]) \
                    if spec.name in tiny_vae.TINY_VAE_COMPONENTS else None
                if controlnet.is_control_component(spec.name):
                    load = partial(controlnet.load_control_component, model_dir, controls, dims)
                load = lora_export.merged_loader(load, model_dir, lora_deltas, spec.name)
                result = export_component(model_dir, spec, work, sizes, opset,
                                          component_precision(spec.name, precision, force_upcast), load)
                mapped = weight_map.write(work, spec.name, result["files"], load or partial(load_component, model_dir))
                if mapped:  # torch parameter -> ONNX initializer, for run-time LoRA and TensorRT refit
                    result["extra"] = {**result["extra"], "weight_map": mapped}
                    result["files"] = [*result["files"], mapped["path"]]  # hashed with the component's files
                components[spec.name] = result
                timings[spec.name] = result["seconds"]
        tokenizer_files = copy_tokenizer(model_dir, work)
        second = {"tokenizer_2": {"dir": "tokenizer_2", "files": copy_tokenizer(model_dir, work, "tokenizer_2")}} \
            if dims.has_text_encoder_2 else {}
        hashed = time.perf_counter()
        source_sha = hash_folder(model_dir)
        tiny_section = {"tiny_vae": tiny_vae.manifest_section(*tiny, hash_folder(tiny[0]))} if tiny else {}
        if controls:
            tiny_section["controlnets"] = controlnet.manifest_section(controls, hash_folder)
        timings["source_hash"] = round(time.perf_counter() - hashed, 2)
        manifest = {
            "format_version": FORMAT_VERSION,
            "sdrt_version": sdrt.__version__,
            "family": dims.family,
            "source": {"path": str(model_dir.absolute()), "sha256": source_sha},
            "dims": dims.to_dict(),
            "sizes": sizes.to_dict(),
            "precision": precision,
            "opset": opset,
            "exporter": EXPORTER,
            "versions": _versions(),
            "components": {
                spec.name: {
                    "files": [file_record(work, name) for name in components[spec.name]["files"]],
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
            "scheduler": scheduler,
            "tokenizer": {"dir": "tokenizer", "files": tokenizer_files},
            **second,
            "pipeline": {"class_name": index.get("_class_name"), "force_zeros_for_empty_prompt":
                         dims.has_text_encoder_2 and bool(index.get("force_zeros_for_empty_prompt", True))},
            # force_upcast: the SDXL pipelines run this VAE in fp32 (it overflows in fp16)
            "vae": {"scaling_factor": float(vae_config.get("scaling_factor") or 0.18215),
                    "shift_factor": vae_config.get("shift_factor"),
                    "force_upcast": force_upcast},
            **tiny_section,
            "loras": lora_records,  # merged at export: name, path, sha256, weight
            "timings": {**timings, "total": round(time.perf_counter() - start, 2)},
        }
        natives = {n: c["native"] for n, c in components.items() if c.get("native")}
        if natives:  # CPU-native graphs of the fp32 components, for a fast ort-cpu load (ort_native.py)
            manifest[ENGINES_KEY] = {NATIVE: ort_optimize.native_section(work, natives, {
                n: files_digest(manifest["components"][n]["files"]) for n in natives})}
        write_json_atomic(work / MANIFEST_NAME, manifest)
        _set_modes(work)
        loaded = load_manifest(work)  # self-check: the runtime must accept what we wrote
        for spec in specs:
            loaded.verified_path(spec.name)
        move_into_place(work, out)
        work = None
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}{where}") from None
    finally:
        if work is not None or created and not out.exists():
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            for folder in created:  # innermost first; only the ones we made, only if empty
                try:
                    folder.rmdir()
                except OSError:
                    break
    total = round(time.perf_counter() - start, 2)
    summary = {
        "engine_dir": str(out),
        "model": str(model_dir),
        "family": dims.family,
        "precision": precision,
        "opset": opset,
        "exporter": EXPORTER,
        "components": {
            name: {"seconds": r["seconds"], "check_error": r["check_error"],
                   "files": {rec["path"]: rec["size"] for rec in manifest["components"][name]["files"]}}
            for name, r in components.items()
        },
        "total_seconds": total,
        "message": f"exported {model_dir} to {out} in {total:.1f} s",
    }
    return summary  # the CLI prints the message; logging it too would show it twice


def _set_modes(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the artifact the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _quiet_hub_progress() -> None:
    """Our own tqdm bar is the progress display; silence the 'Loading weights' bars."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _versions() -> dict:
    import diffusers
    import onnx
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__}
