"""``sdrt export`` for Kandinsky 2.2: prior + decoder folders -> one ENGINE_DIR (family ``kandinsky22``).

Six ONNX components (``sdrt/specs_kandinsky.py``): the prior's text encoder, the PriorTransformer, the CLIP
image encoder, the decoder UNet and the MoVQ decoder and encoder. Each is exported like the SD components
(``exporter.torch_export``, ``graph.clean_up``, fp16 with fp32 islands via ``fp16.convert``) and checked
against torch with ONNX Runtime at two shapes (relative L2 error <= ``exporter.TOLERANCE``, fp16:
``fp16.FP16_TOLERANCE`` on the emulated strongly typed graph); an fp32 component's check session also
writes its CPU-native graph (``engines.ort-cpu-native``, ``ort_optimize.check_session``), as SD exports do.
The decoder UNet is traced and checked at latent sides that are multiples of 8 (pixels: multiples of 64,
what ``downscale_height_and_width`` makes): its Resnet up-blocks take no upsample size, so other sides are
not served. Constants go to ``constants/*.npy``: ``negative_image_embeds`` (diffusers' ``get_zero_embed``:
the image encoder on an all-zero image, the decoder's negative when no negative prompt is given; the ONNX
image encoder is checked on that image too), ``clip_mean`` and ``clip_std`` (``post_process_latents``).
Built in a temporary sibling and renamed into place, like every export.
"""

from __future__ import annotations

import gc
import io
import logging
import shutil
import time
from pathlib import Path

import numpy as np

import sdrt
from sdrt.errors import ExportError, InputError, ModelError, OutputExistsError, SdrtError
from sdrt.manifest import FORMAT_VERSION, MANIFEST_NAME, file_record, load_manifest, write_json_atomic
from sdrt.progress import progress_bar
from sdrt.specs import HEIGHT, LATENT_HEIGHT, ComponentSpec, SizeRange, build_specs
from sdrt.specs_kandinsky import ATTENTION_MASK, CLIP_MEAN, CLIP_STD, CONSTANTS_KEY, DECODER_UNET, IMAGE_ENCODER, \
    MOVQ_DECODER, NEGATIVE_IMAGE_EMBEDS, PRIOR, PRIOR_SCHEDULER_KEY, TIMESTEP
from sdrt_export import artifact, exporter, fp16, graph, ort_optimize
from sdrt_export.checks import check_points, random_inputs, relative_error, run_torch
from sdrt_export.kandinsky_model import COMBINED, Layout, dims_from_layout, find_layout, load_component, \
    load_module
from sdrt_export.wrappers import read_json

log = logging.getLogger(__name__)

# fp32 islands per component (fp16.py's policies): the prior has a timestep embedding like the UNet; MoVQ's
# decoder the VAE's up-block island (diffusers names its decoder module ``decoder`` too)
ISLANDS = {PRIOR: (fp16.TIMESTEP, fp16.NORMS, fp16.SOFTMAX), DECODER_UNET: fp16.ISLANDS[DECODER_UNET],
           MOVQ_DECODER: (fp16.VAE_UP, fp16.NORMS, fp16.SOFTMAX)}


def spatial_points(sizes: SizeRange, spec: ComponentSpec) -> tuple[list, tuple]:
    """(check points, trace point) on pixel sides that are multiples of scale**2 (latent multiples of 8)."""
    step = spec.scale * 8
    lo = min(-(-sizes.min_size // step) * step, sizes.max_size)
    hi = max(sizes.max_size // step * step, lo)
    wide, batch2 = min(lo + step, hi), min(2, sizes.max_batch * spec.batch_factor)
    return [(1, lo, wide), (batch2, hi, hi)], (batch2, wide, lo)


def make_inputs(spec: ComponentSpec, point, rng: np.random.Generator) -> list[np.ndarray]:
    """Random inputs as the pipelines feed them: a prefix-ones text mask, integer timesteps."""
    arrays = random_inputs(spec, *point, rng)
    for i, t in enumerate(spec.inputs):
        if t.name == ATTENTION_MASK:
            lengths = rng.integers(2, arrays[i].shape[1] + 1, size=arrays[i].shape[0])
            arrays[i] = (np.arange(arrays[i].shape[1])[None, :] < lengths[:, None]).astype(t.dtype)
        elif t.name == TIMESTEP:
            arrays[i] = rng.integers(0, 1000, size=arrays[i].shape).astype(t.dtype)
    return arrays


def export_one(layout: Layout, spec: ComponentSpec, work: Path, sizes: SizeRange, opset: int, precision: str,
               module=None, extra_cases=()) -> dict:
    """Export one component to ``work`` and check it against torch; ``module``: an already loaded wrapper."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    module = module if module is not None else load_component(layout, spec.name)
    if any(LATENT_HEIGHT in t.dims or HEIGHT in t.dims for t in spec.inputs):  # UNet, MoVQ
        points, trace = spatial_points(sizes, spec)
    else:
        points, trace = check_points(sizes, spec), (2, sizes.min_size, sizes.min_size)
    cases = [make_inputs(spec, p, rng) for p in points] + [list(c) for c in extra_cases]
    references = [run_torch(module, arrays) for arrays in cases]
    raw = work / f".raw-{spec.name}"
    raw.mkdir()
    try:
        try:
            exporter.torch_export(module, spec, make_inputs(spec, trace, rng), raw / f"{spec.name}.onnx", opset)
            del module
            gc.collect()
            if precision == "fp16":
                clean = graph.clean_up(raw / f"{spec.name}.onnx", raw / "clean.onnx")
                files, extra = fp16.convert(raw / clean[0], work / f"{spec.name}.onnx",
                                            ISLANDS.get(spec.name, fp16.ISLANDS[fp16.TEXT_ENCODER]))
            else:
                files, extra = graph.clean_up(raw / f"{spec.name}.onnx", work / f"{spec.name}.onnx"), {}
            graph.check_model(work / files[0])
            # fp32: the check's session also writes the CPU-native graph, as for SD (ort_optimize.py)
            session, native = ort_optimize.parity_session(work, spec.name, files, precision, raw)
        finally:
            shutil.rmtree(raw, ignore_errors=True)
        errors = [max(relative_error(g, w) for g, w in zip(session.run(spec.output_names,
                                                                       dict(zip(spec.input_names, arrays))), want))
                  for arrays, want in zip(cases, references)]
        del session
    except (SdrtError, OSError):
        raise
    except Exception as exc:  # torch / onnx / ORT failures: one line, traceback in the log
        log.debug("%s export failed", spec.name, exc_info=True)
        raise ExportError(f"{spec.name}: export failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    gc.collect()
    error, tolerance = max(errors), fp16.FP16_TOLERANCE if precision == "fp16" else exporter.TOLERANCE
    if not error <= tolerance:
        raise ExportError(f"{spec.name}: ONNX Runtime ({precision}) differs from torch, relative L2 error "
                          f"{error:.3g} > {tolerance:g} (shapes {points})")
    seconds = time.perf_counter() - start
    log.info("%s: exported and checked in %.1f s, relative L2 error %.2e", spec.name, seconds, error)
    return {"files": files, "precision": precision, "seconds": round(seconds, 2), "check_error": error,
            "check_shapes": [list(p) for p in points], "extra": extra, "native": native}


def _save_constant(work: Path, name: str, array: np.ndarray) -> dict:
    """constants/NAME.npy (float32), its file record plus shape and dtype."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    (work / "constants").mkdir(exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    (work / "constants" / f"{name}.npy").write_bytes(buffer.getvalue())
    return {**file_record(work, f"constants/{name}.npy"), "shape": list(array.shape), "dtype": "float32"}


def _copy_folder(src: Path, work: Path, name: str) -> list[dict]:
    (work / name).mkdir()
    for file in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")):
        shutil.copy2(file, work / name / file.name)
    return [file_record(work, f"{name}/{p.name}") for p in sorted((work / name).iterdir())]


def export_kandinsky(model, out, prior=None, sizes: SizeRange | None = None, opset: int | None = None,
                     force: bool = False, progress: bool = True, precision: str = "fp32") -> dict:
    """Export a Kandinsky 2.2 prior + decoder (``kandinsky_model.find_layout``) to ENGINE_DIR ``out``."""
    start = time.perf_counter()
    sizes = sizes or SizeRange()
    opset = exporter.DEFAULT_OPSET if opset is None else int(opset)
    if opset not in exporter.SUPPORTED_OPSETS:
        raise InputError(f"opset {opset} is not supported; use {exporter.SUPPORTED_OPSETS[0]}.."
                         f"{exporter.SUPPORTED_OPSETS[-1]}")
    if precision not in fp16.PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported; use {' or '.join(fp16.PRECISIONS)}")
    layout = find_layout(model, prior)
    if layout is None:
        raise ExportError(f"{model} is not a Kandinsky 2.2 prior + decoder")
    dims = dims_from_layout(layout)
    specs = build_specs(dims)
    scheduler = read_json(layout.decoder / "scheduler" / "scheduler_config.json")
    artifact.check_scheduler(scheduler)
    prior_scheduler = read_json(layout.prior / "scheduler" / "scheduler_config.json")
    tokenizer_dir = layout.prior / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file() and not all(
            (tokenizer_dir / n).is_file() for n in ("vocab.json", "merges.txt")):
        raise ModelError(f"{tokenizer_dir} has neither tokenizer.json nor vocab.json + merges.txt")
    out = Path(out).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; remove it first")

    artifact.quiet_hub_progress()
    work, created = None, []
    try:
        work = exporter.make_temp_dir(out, created)
        components, constants = {}, {}
        with progress_bar(list(specs), desc="export", unit="component", enabled=progress) as bar:
            for spec in bar:
                bar.set_postfix_str(spec.name)
                module, extra_cases = None, ()
                if spec.name == IMAGE_ENCODER:  # diffusers' get_zero_embed, from the fp32 torch module
                    module = load_component(layout, IMAGE_ENCODER)
                    size = dims.image_encoder_size
                    zeros = np.zeros((1, dims.image_channels, size, size), np.float32)
                    constants[NEGATIVE_IMAGE_EMBEDS] = _save_constant(work, NEGATIVE_IMAGE_EMBEDS,
                                                                      run_torch(module, [zeros])[0])
                    extra_cases = ([zeros],)
                elif spec.name == PRIOR:
                    stats = load_module(layout, PRIOR)
                    for name in (CLIP_MEAN, CLIP_STD):
                        constants[name] = _save_constant(work, name, getattr(stats, name).detach().numpy())
                    del stats
                components[spec.name] = export_one(layout, spec, work, sizes, opset, precision, module, extra_cases)
        tokenizer_files = exporter.copy_tokenizer(layout.prior, work)
        processor = layout.prior / "image_processor"
        extra_sections = {"image_processor": {"dir": "image_processor", "files": _copy_folder(processor, work,
                                                                                              "image_processor")}} \
            if processor.is_dir() else {}
        hashed = time.perf_counter()
        source_sha = layout.sha256()
        decoder_class = layout.decoder_class
        manifest = {
            "format_version": FORMAT_VERSION,
            "sdrt_version": sdrt.__version__,
            "family": dims.family,
            "source": {"path": str(layout.source), "prior": None if layout.root else str(layout.prior.absolute()),
                       "sha256": source_sha},
            "dims": dims.to_dict(),
            "sizes": sizes.to_dict(),
            "precision": precision,
            "opset": opset,
            "exporter": exporter.EXPORTER,
            "versions": artifact.versions(),
            "components": {
                spec.name: {"files": [file_record(work, f) for f in components[spec.name]["files"]], "format": "onnx",
                            "precision": components[spec.name]["precision"], **components[spec.name]["extra"],
                            "inputs": spec.input_names, "outputs": spec.output_names, "profile": spec.profile(sizes),
                            "check_error": components[spec.name]["check_error"],
                            "check_shapes": components[spec.name]["check_shapes"]}
                for spec in specs
            },
            "scheduler": scheduler,  # the decoder's (DDPMScheduler in the published model)
            PRIOR_SCHEDULER_KEY: prior_scheduler,
            "tokenizer": {"dir": "tokenizer", "files": tokenizer_files},
            **extra_sections,
            CONSTANTS_KEY: constants,
            "pipeline": {"class_name": COMBINED[decoder_class], "decoder_class_name": decoder_class,
                         "prior_class_name": read_json(layout.prior / "model_index.json")["_class_name"],
                         "force_zeros_for_empty_prompt": False},
            # the Kandinsky pipelines decode MoVQ latents as they are: no scaling factor
            "vae": {"class_name": "VQModel", "scaling_factor": 1.0, "shift_factor": None, "force_upcast": False},
            "timings": {**{n: c["seconds"] for n, c in components.items()},
                        "source_hash": round(time.perf_counter() - hashed, 2),
                        "total": round(time.perf_counter() - start, 2)},
        }
        manifest.update(ort_optimize.engines_section(work, components, manifest["components"]))
        write_json_atomic(work / MANIFEST_NAME, manifest)
        artifact.set_modes(work)
        loaded = load_manifest(work)  # self-check: the runtime must accept what we wrote
        for spec in specs:
            loaded.verified_path(spec.name)
        for name in constants:
            loaded.constant(name)
        exporter.move_into_place(work, out)
        work = None
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}{where}") from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if work is not None or created and not out.exists():
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
    total = round(time.perf_counter() - start, 2)
    return {"engine_dir": str(out), "model": str(layout.source), "prior": str(layout.prior.absolute()),
            "family": dims.family, "precision": precision, "opset": opset, "exporter": exporter.EXPORTER,
            "components": {name: {"seconds": r["seconds"], "check_error": r["check_error"],
                                  "files": {rec["path"]: rec["size"] for rec in manifest["components"][name]["files"]}}
                           for name, r in components.items()},
            "constants": {name: record["shape"] for name, record in constants.items()},
            "total_seconds": total, "message": f"exported {layout.source} to {out} in {total:.1f} s"}
