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
import shutil
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

import sdrt
from sdrt.backends import ort_native
from sdrt.errors import ExportError, InputError, ModelError, OutputExistsError, SdrtError
from sdrt.manifest import MANIFEST_NAME, file_record, load_manifest, write_json_atomic
from sdrt.progress import progress_bar
from sdrt.specs import VAE_DECODER, VAE_ENCODER, ComponentSpec, SizeRange, build_specs
from sdrt_export import artifact, controlnet, fp16, graph, ort_optimize, resume as resumable, tiny_vae, weight_map
from sdrt_export import lora as lora_export
from sdrt_export.checks import check_points, random_inputs, relative_error, run_torch, trace_point
from sdrt_export.folders import copy_tokenizer, make_parents, make_temp_dir, move_into_place, validate_model_dir
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
            # fp32: the check's session also writes the CPU-native graph (ort_optimize.py)
            session, native = ort_optimize.parity_session(work, spec.name, files, precision, raw_dir)
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


def export_model(model, out, sizes: SizeRange | None = None, opset: int | None = None, force: bool = False,
                 progress: bool = True, precision: str = "fp32", tiny_vae_dir=None, controlnet_dirs=(),
                 loras=None, prior=None, resume: bool = False) -> dict:
    """Export a diffusers SD pipeline folder to ENGINE_DIR ``out`` in ``precision`` (fp32, or fp16
    with fp32 islands), with the AutoencoderTiny in ``tiny_vae_dir`` too if given, and each ControlNet folder in
    ``controlnet_dirs`` (``controlnet.py``), with ``loras`` (``["FILE[:WEIGHT]" or (path, weight)]``, ``lora.py``)
    merged; return a JSON-able summary. ``resume``: stage in ``.OUT.partial`` and keep the checked components
    there on a failure, reusing them on the next ``resume`` run with the same inputs (``resume.py``)."""
    start = time.perf_counter()
    from sdrt_export.kandinsky_model import find_layout  # Kandinsky 2.2: prior + decoder, its own exporter

    if prior is not None or find_layout(model) is not None:
        if tiny_vae_dir is not None or controlnet_dirs or resume:
            raise InputError("--tiny-vae, --controlnet and --resume are for Stable Diffusion models, not Kandinsky 2.2")
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
    read = {"scheduler": read_json(model_dir / "scheduler" / "scheduler_config.json"),
            "vae": read_json(model_dir / "vae" / "config.json"), "index": read_json(model_dir / "model_index.json")}
    artifact.check_scheduler(read["scheduler"])
    force_upcast = dims.has_text_encoder_2 and bool(read["vae"].get("force_upcast", True))
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

    artifact.quiet_hub_progress()
    lora_deltas, lora_records = lora_export.plan(model_dir, dims, loras)  # LoRA errors before minutes of export
    staged = resumable.Partial(out, resumable.plan_key(
        model=resumable.folder_listing(model_dir), tiny=resumable.folder_listing(tiny and tiny[0]),
        controls=[resumable.folder_listing(c[0]) for c in controls], loras=lora_records, sizes=sizes.to_dict(),
        opset=opset, precision=precision, sdrt=sdrt.__version__, versions=artifact.versions(),
        ort=ort_native.settings())) if resume else None
    if not resume and resumable.partial_dir(out).is_dir():
        log.warning("%s holds a partial export; pass --resume to continue it", resumable.partial_dir(out))
    work, created, resumed = None, [], []
    try:
        if staged:
            make_parents(out, created)
            work = staged.open()
        else:
            work = make_temp_dir(out, created)
        components, timings = {}, {}
        with progress_bar(list(specs), desc="export", unit="component", enabled=progress) as bar:
            for spec in bar:
                bar.set_postfix_str(spec.name)
                result = staged and staged.reuse(spec.name)
                if result:
                    resumed.append(spec.name)
                else:
                    result = _export_one(model_dir, spec, work, sizes, opset, component_precision(
                        spec.name, precision, force_upcast), tiny, controls, dims, lora_deltas)
                    if staged:
                        staged.record(spec.name, result)
                components[spec.name] = result
                timings[spec.name] = result["seconds"]
        tokenizers = {"tokenizer": {"dir": "tokenizer", "files": copy_tokenizer(model_dir, work)}}
        if dims.has_text_encoder_2:
            tokenizers["tokenizer_2"] = {"dir": "tokenizer_2", "files": copy_tokenizer(model_dir, work, "tokenizer_2")}
        manifest = artifact.sd_manifest(
            work, specs, components, staged.file_record if staged else file_record, model_dir=model_dir, dims=dims,
            sizes=sizes, precision=precision, opset=opset, exporter=EXPORTER, read=read, force_upcast=force_upcast,
            tokenizers=tokenizers, tiny=tiny, controls=controls, lora_records=lora_records, timings=timings,
            start=start)
        write_json_atomic(work / MANIFEST_NAME, manifest)
        artifact.set_modes(work)
        loaded = load_manifest(work)  # self-check: the runtime must accept what we wrote
        for spec in specs:
            loaded.verified_path(spec.name)
        if staged:
            staged.finish()
        move_into_place(work, out)
        work = None
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        error = ExportError(f"cannot write {out}: {exc.strerror or exc}{where}")
        work = _keep(staged, work, error)
        raise error from None
    except BaseException as exc:
        work = _keep(staged, work, exc)
        raise
    finally:
        if staged:
            staged.close()
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
        "resumed": resumed,
        "total_seconds": total,
        "message": f"exported {model_dir} to {out} in {total:.1f} s",
    }
    return summary  # the CLI prints the message; logging it too would show it twice


def _export_one(model_dir: Path, spec: ComponentSpec, work: Path, sizes: SizeRange, opset: int, precision: str,
                tiny, controls, dims, lora_deltas) -> dict:
    """One component of ``export_model``: its loader (tiny VAE, ControlNet, merged LoRAs), export and check,
    then its weight map (torch parameter -> ONNX initializer, for run-time LoRA and TensorRT refit)."""
    load = partial(tiny_vae.load_tiny_component, tiny[0]) if spec.name in tiny_vae.TINY_VAE_COMPONENTS else None
    if controlnet.is_control_component(spec.name):
        load = partial(controlnet.load_control_component, model_dir, controls, dims)
    load = lora_export.merged_loader(load, model_dir, lora_deltas, spec.name)
    result = export_component(model_dir, spec, work, sizes, opset, precision, load)
    mapped = weight_map.write(work, spec.name, result["files"], load or partial(load_component, model_dir))
    if mapped:
        result["extra"] = {**result["extra"], "weight_map": mapped}
        result["files"] = [*result["files"], mapped["path"]]  # hashed with the component's files
    return result


def _keep(staged, work, exc: BaseException):
    """On a failure of a ``--resume`` export, keep its checked components (the folder is then not removed)."""
    if staged is not None and work is not None:
        staged.keep(exc)
        return None
    return work
