"""What a ``sdrt build-engines`` run asks for and records (``build_engines.py`` does the building).

The request side: the ``--static`` size, each component's min/opt/max profile, the command that rebuilds
an artifact, the backend's flavour and options (and, for ``tensorrt``, this machine's GPU). The record
side: the manifest fields that decide whether an engine is kept, saving one record, the run's summary.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from sdrt.errors import ArtifactError, ExportError, InputError
from sdrt.manifest import ENGINES_KEY, MANIFEST_NAME, Manifest, write_json_atomic
from sdrt.specs import BATCH, ComponentSpec, SizeRange
from sdrt_export import refit as refit_plan
from sdrt_export import trt_builder
from sdrt_export.trt_builder import BuildOptions

TRT_BACKENDS = ("tensorrt", "tensorrt-rtx")
BUILD_BACKENDS = (*TRT_BACKENDS, "ort-cpu", "ort-cuda")
TIMING_CACHE, RUNTIME_CACHE = "timing.cache", "runtime.cache"


def parse_static(value, sizes: SizeRange | None = None) -> tuple[int, int] | None:
    """``"512x768"`` -> (width, height), checked against the export's size range."""
    if value is None:
        return None
    try:
        width, height = value if isinstance(value, tuple) else (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise InputError(f"--static takes WIDTHxHEIGHT such as 512x512, got {value!r}") from None
    for label, side in (("width", width), ("height", height)):
        if sizes and (side % 8 or not sizes.min_size <= side <= sizes.max_size):
            raise InputError(f"--static {label} {side} must be a multiple of 8 in {sizes.min_size}..{sizes.max_size} "
                             "(the export size range)")
    return width, height


def profile_for(spec: ComponentSpec, sizes: SizeRange, static: tuple[int, int] | None = None) -> dict:
    """min/opt/max of every input from the spec; ``static`` fixes height and width (min=opt=max) and
    keeps the spec's batch range."""
    base = spec.profile(sizes)
    if static is None:
        return {name: [list(s) for s in shapes] for name, shapes in base.items()}
    width, height = static
    profile = {}
    for t in spec.inputs:
        axis = t.dims.index(BATCH) if BATCH in t.dims else None
        batches = [shape[axis] if axis is not None else 1 for shape in base[t.name]]
        profile[t.name] = [list(t.shape(b, height, width, spec.scale)) for b in batches]
    return profile


def build_command(model_dir: Path, out: Path, backend: str, sizes: SizeRange, static, options: BuildOptions,
                  precision: str, refit: bool = False) -> str:
    parts = ["sdrt", "build-engines", "--model", str(model_dir), "--out", str(out), "--backend", backend,
             "--min-size", str(sizes.min_size), "--opt-size", str(sizes.opt_size),
             "--max-size", str(sizes.max_size), "--max-batch", str(sizes.max_batch), "--precision", precision]
    if static:
        parts += ["--static", f"{static[0]}x{static[1]}"]
    if backend in TRT_BACKENDS:
        parts += ["--builder-level", str(options.builder_level)]
        if options.workspace_gb is not None:
            parts += ["--workspace", f"{options.workspace_gb:g}"]
        if options.targets:
            parts += ["--gpu-targets", ",".join(t.lower() for t in options.targets)]
    if refit:
        parts.append("--refit")
    return shlex.join(parts)


def _wanted(manifest: Manifest, backend: str, spec: ComponentSpec, profile: dict, common: dict,
            refit: bool = False) -> dict:
    """The record fields that decide whether an existing engine can be kept."""
    wanted = {**common, "onnx_sha256": manifest.onnx_digest(spec.name)}
    if backend in TRT_BACKENDS:
        wanted["profile"] = profile
        wanted["refit"] = refit_plan.wanted(manifest, spec.name, refit)  # None (plain) matches older records
    return wanted


def _is_current(manifest: Manifest, backend: str, name: str, wanted: dict) -> bool:
    record = manifest.engines(backend).get("components", {}).get(name) or {}
    if any(record.get(key) != value for key, value in wanted.items()):
        return False
    try:
        manifest.verified_engine(backend, name)
    except ArtifactError:
        return False
    return True


def _save_record(out: Path, backend: str, section: dict, name: str, record: dict) -> None:
    """Re-read the manifest and add one engine record to it (atomically)."""
    data = json.loads((out / MANIFEST_NAME).read_text())
    engines = data.setdefault(ENGINES_KEY, {})
    current = engines.get(backend) or {}
    engines[backend] = {**section, "components": {**current.get("components", {}), name: record}}
    write_json_atomic(out / MANIFEST_NAME, data)


def _flavour(backend: str, builder_level: int, workspace_gb: float | None, gpu_targets: str | None) -> tuple:
    """(TensorRT module or None, build options, the record fields every component shares)."""
    if gpu_targets and backend != "tensorrt-rtx":
        raise InputError("--gpu-targets is for --backend tensorrt-rtx (tensorrt builds for this machine's GPU)")
    if backend not in TRT_BACKENDS:
        from sdrt_export import ort_optimize

        return None, BuildOptions(builder_level, workspace_gb), ort_optimize.plan(backend)
    gpu = _require_gpu() if backend == "tensorrt" else None
    trt = trt_builder.import_flavour(backend)
    targets = trt_builder.rtx_targets(trt, gpu_targets) if backend == "tensorrt-rtx" else ()
    options = BuildOptions(builder_level, workspace_gb, targets)
    where = {"compute_capability": gpu.compute_capability} if gpu else \
        {"targets": list(targets) or trt_builder.DEFAULT_TARGETS}
    return trt, options, {"flavour": trt.__name__, "version": trt.__version__, "options": options.to_dict(), **where}


def _require_gpu():
    from sdrt.backends.cuda import CudaError, gpu_info

    try:
        return gpu_info()
    except CudaError as exc:
        raise ExportError(f"backend tensorrt builds for this machine's GPU and there is none ({exc}); build "
                          "ahead of time with --backend tensorrt-rtx, or run on a machine with an NVIDIA GPU") from None


def _summary(out, backend, common, built, cached, exported, timings, start, message) -> dict:
    if exported:  # the export's own line is INFO (-v); the result says it happened
        message = f"exported the ONNX first ({exported}); {message}"
    return {"engine_dir": str(out), "backend": backend, "flavour": common.get("flavour"),
            "version": common.get("version"), "built": built, "cached": cached, "exported": exported,
            "components": timings, "total_seconds": round(time.perf_counter() - start, 2), "message": message}
