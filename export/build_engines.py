"""``sdrt build-engines``: ENGINE_DIR's ONNX -> TensorRT / TensorRT-RTX engines (or ONNX Runtime-optimized
graphs), recorded in the manifest under ``engines`` and rebuilt only when something they depend on changed.

Exports first when ENGINE_DIR has no manifest or was exported from another model folder, size range or
precision. Then builds one component at a time: engine written to a temp file and renamed into
``ENGINE_DIR/<backend>/``, then its record (ONNX digest, flavour and version, GPU or targets, profile,
options, sha256) written to the manifest atomically, so an interrupted build keeps what finished and
never leaves a partial engine. A component whose record matches the request and whose file matches its
sha256 is skipped; a run with nothing to do writes nothing and says so.

The request and the records (profiles, the rebuild command, flavours, which records are current) are
build_plan.py's.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from sdrt.errors import ExportError, InputError, OutputExistsError
from sdrt.manifest import MANIFEST_NAME, file_record, load_manifest
from sdrt.progress import progress_bar
from sdrt.specs import SizeRange
from sdrt_export import refit as refit_plan
from sdrt_export import trt_builder
from sdrt_export.build_plan import (  # noqa: F401  (re-exported: callers import them from here)
    BUILD_BACKENDS, RUNTIME_CACHE, TIMING_CACHE, TRT_BACKENDS, _flavour, _is_current, _require_gpu, _save_record,
    _summary, _wanted, build_command, parse_static, profile_for,
)
from sdrt_export.trt_builder import LABELS

log = logging.getLogger(__name__)


def ensure_onnx(model, out: Path, sizes: SizeRange, precision: str, progress: bool, prior=None) -> str | None:
    """Export into ``out`` unless its manifest already has this model, size range and precision;
    return why it exported (None when it did not)."""
    try:
        from sdrt_export.exporter import export_model
        from sdrt_export.folders import hash_folder, validate_model_dir
    except ImportError as exc:
        raise ExportError(f"build-engines exports with torch ({exc.name} is missing): "
                          "pip install torch==2.13.0 && pip install 'sdrt[export]'") from None

    from sdrt_export.kandinsky_model import find_layout

    layout = find_layout(model, prior)  # Kandinsky 2.2: prior + decoder, one digest of both
    model_dir = layout.source if layout else validate_model_dir(model)
    controlnets = []  # a re-export keeps the artifact's ControlNets (``sdrt export --controlnet``)
    if (out / MANIFEST_NAME).is_file():
        manifest = load_manifest(out)
        controlnets = [record["path"] for record in manifest.data.get("controlnets", [])]
        reason = None
        have, want = (manifest.sizes.min_size, manifest.sizes.max_size, manifest.sizes.max_batch), \
            (sizes.min_size, sizes.max_size, sizes.max_batch)
        if have != want:  # the opt size only shapes engine profiles, the ONNX does not depend on it
            reason = "its sizes {}..{} x{} differ from {}..{} x{}".format(*have, *want)
        elif manifest.data.get("precision", "fp32") != precision:
            reason = f"it holds {manifest.data.get('precision', 'fp32')} ONNX, {precision} was asked for"
        elif manifest.data.get("source", {}).get("sha256") != (layout.sha256() if layout else hash_folder(model_dir)):
            reason = f"it was exported from another version of {model_dir}"
        if reason is None:
            return None
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not an sdrt ENGINE_DIR (no {MANIFEST_NAME}); "
                                "choose another --out or remove it")
    else:
        reason = "it has no ONNX export yet"
    kwargs = {}
    if "precision" in inspect.signature(export_model).parameters:
        kwargs["precision"] = precision
    elif precision != "fp32":
        raise InputError(f"this sdrt's exporter writes fp32 ONNX only; --precision {precision} is not available")
    log.info("exporting %s to %s first: %s", model_dir, out, reason)
    cache = out / "tensorrt" / TIMING_CACHE
    kept = cache.read_bytes() if cache.is_file() else None  # tuning results outlive a re-export
    if controlnets:
        kwargs["controlnet_dirs"] = controlnets
    if prior is not None:
        kwargs["prior"] = prior
    if layout is None and "resume" in inspect.signature(export_model).parameters:
        kwargs["resume"] = True  # a failed or killed export keeps its checked components for the next run
    export_model(model_dir, out, sizes=sizes, force=True, progress=progress, **kwargs)
    if kept:
        cache.parent.mkdir(exist_ok=True)
        write_bytes_atomic(cache, kept)
    return reason


def _write_all(handle, data) -> None:
    handle.write(memoryview(data))


def write_bytes_atomic(path: Path, data) -> None:
    """Write a buffer to a temp file beside ``path``, fsync it and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_trt(backend, trt, manifest, spec, profile, options, cache_path: Path | None, refit=None) -> tuple:
    onnx_path = manifest.verified_path(spec.name)
    cache = cache_path.read_bytes() if cache_path and cache_path.is_file() else None
    weights = refit_plan.targets(manifest, spec.name) if refit else None
    serialized, fields, new_cache = trt_builder.build_engine(backend, trt, onnx_path, spec, profile, options, cache,
                                                             None if weights is None else list(weights))
    relpath = f"{backend}/{spec.name}.engine"
    plan = [] if weights is None else [refit_plan.save(manifest, backend, spec.name, weights, fields)]
    if backend == "tensorrt-rtx":  # written by the runtime: what TensorRT-RTX compiles on the GPU
        fields["runtime_cache"] = f"{backend}/{spec.name}.{RUNTIME_CACHE}"
    write_bytes_atomic(manifest.root / relpath, serialized)
    del serialized
    if cache_path and new_cache and new_cache != cache:
        write_bytes_atomic(cache_path, new_cache)
    return [relpath, *plan], fields


def _build_ort(backend, settings, manifest, spec, folder: Path) -> tuple:
    from sdrt_export import ort_optimize

    onnx_path = manifest.verified_path(spec.name)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=folder))
    try:
        names, fields = ort_optimize.optimize(onnx_path, work, spec.name, settings,
                                              external=len(manifest.component(spec.name)["files"]) > 1)
        for name in reversed(names):  # external data first, the graph that points at it last
            os.replace(work / name, folder / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [f"{backend}/{name}" for name in names], fields


def build_engines(model, out, backend: str, sizes: SizeRange | None = None, static=None, builder_level: int = 3,
                  workspace_gb: float | None = None, precision: str = "fp32", gpu_targets: str | None = None,
                  force: bool = False, progress: bool = True, refit: bool = False, prior=None) -> dict:
    """Build (or reuse) ``backend`` engines for every component of ENGINE_DIR ``out``; return a summary.
    ``refit``: engines whose weight-map weights TensorRT can refit (run-time LoRA; ``refit.py``)."""
    start = time.perf_counter()
    if backend not in BUILD_BACKENDS:
        raise InputError(f"unknown backend {backend!r}; build-engines knows {', '.join(BUILD_BACKENDS)}")
    if not 0 <= builder_level <= 5:
        raise InputError(f"builder-level must be 0..5, got {builder_level}")
    if workspace_gb is not None and not workspace_gb > 0:
        raise InputError(f"workspace must be a positive number of GB, got {workspace_gb}")
    if refit:
        refit_plan.check_request(backend, TRT_BACKENDS)
    out = Path(out).expanduser().absolute()
    if sizes is None:  # the artifact's own range, or the defaults for a new export
        sizes = load_manifest(out).sizes if (out / MANIFEST_NAME).is_file() else SizeRange()
    static = parse_static(static, sizes)
    model_dir = Path(model).expanduser().absolute()
    trt, options, common = _flavour(backend, builder_level, workspace_gb, gpu_targets)
    command = build_command(model_dir, out, backend, sizes, static, options, precision, refit)
    if prior is not None:  # Kandinsky 2.2 decoder folder + its prior folder
        command += " " + shlex.join(["--prior", str(Path(prior).expanduser().absolute())])
    exported = ensure_onnx(model_dir, out, sizes, precision, progress, prior)
    manifest = load_manifest(out)
    specs = [spec for spec in manifest.specs if manifest.has(spec.name)]
    if refit:
        refit_plan.require_weight_maps(manifest, [spec.name for spec in specs])
    profiles = {spec.name: profile_for(spec, sizes, static) for spec in specs}
    wanted = {spec.name: _wanted(manifest, backend, spec, profiles[spec.name], common, refit) for spec in specs}
    todo = [s for s in specs if force or not _is_current(manifest, backend, s.name, wanted[s.name])]
    label = LABELS.get(backend, backend)
    if not todo:
        natives = _native_graphs(out, backend, specs, force)
        message = f"{label} engines in {out} are up to date ({len(specs)} cached); " + \
            (f"wrote CPU-native graphs of {', '.join(natives)}" if natives else "nothing to build")
        return _summary(out, backend, common, [], [s.name for s in specs], exported, {}, start, message)

    folder = out / backend
    section = {"command": command, **{k: common[k] for k in ("flavour", "version")},
               **({"refit": refit} if trt is not None else {})}
    cache_path = None
    if backend == "tensorrt":
        cache_path = folder / TIMING_CACHE
        section["timing_cache"] = f"{backend}/{TIMING_CACHE}"
    built = {}
    try:
        folder.mkdir(exist_ok=True)
        with progress_bar(todo, desc=f"build {backend}", unit="engine", enabled=progress) as bar:
            for spec in bar:  # one at a time: only one network and builder are alive at once
                bar.set_postfix_str(spec.name)
                began = time.perf_counter()
                if trt is not None:
                    files, fields = _build_trt(backend, trt, manifest, spec, profiles[spec.name], options, cache_path,
                                               wanted[spec.name]["refit"])
                else:
                    files, fields = _build_ort(backend, common, manifest, spec, folder)
                seconds = round(time.perf_counter() - began, 2)
                record = {**wanted[spec.name], **fields, "files": [file_record(out, f) for f in files],
                          "precision": manifest.data.get("precision", "fp32"),
                          "static": list(static) if static else None, "seconds": seconds}
                _save_record(out, backend, section, spec.name, record)
                built[spec.name] = {"seconds": seconds, "bytes": sum(r["size"] for r in record["files"])}
                log.info("%s: built %s engine in %.1f s (%.1f MB)", spec.name, label, seconds,
                         built[spec.name]["bytes"] / 1e6)
                gc.collect()
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}{where}") from None
    _native_graphs(out, backend, specs, force)
    load_manifest(out)  # self-check: the runtime must accept what we wrote
    cached = [s.name for s in specs if s.name not in built]
    message = (f"built {len(built)} {label} engine(s) ({', '.join(built)}) in {out} in "
               f"{time.perf_counter() - start:.1f} s" + (f"; {len(cached)} cached" if cached else ""))
    return _summary(out, backend, common, list(built), cached, exported, built, start, message)


def _native_graphs(out: Path, backend: str, specs: list, force: bool) -> list[str]:
    """ort-cpu: (re)write each component's CPU-native graph from its ort-cpu graph unless a current one is
    there (``sdrt/backends/ort_native.py``); return the components written."""
    if backend != "ort-cpu":
        return []
    from sdrt_export import ort_optimize

    try:
        return [s.name for s in specs if ort_optimize.write_native(load_manifest(out), s.name, force)]
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
