"""ort-* backends of ``sdrt build-engines``: ONNX graphs rewritten once by ONNX Runtime's optimizer, so a
session does not redo the rewriting at every load.

ORT_ENABLE_ALL output adds layout transforms tied to this CPU, so it is never saved. ort-cpu saves
ORT_ENABLE_EXTENDED (fusions into ONNX Runtime's contrib ops for the CPU provider); ort-cuda saves
EXTENDED with the CUDA provider when onnxruntime-gpu is installed and otherwise the hardware-neutral
BASIC level, since fusions made for the CPU provider would pin nodes to it. The level and providers
are recorded with each graph.

ort-cpu graphs also get diffusers' attention rewritten into ONNX Runtime's fused CPU
``com.microsoft::MultiHeadAttention`` kernel (``attention_fusion.py``) before ORT's optimizer runs
(its MatMul+Mul fusions would otherwise hide the pattern). This happens here, not in ``sdrt export``:
the exported ONNX stays standard ONNX for TensorRT and other runtimes, while this graph is already
ONNX Runtime's own and tied to its version, and it is derived from the recorded ONNX (no torch, no
second export), so the ``onnx_sha256`` in its record still says what it was built from.

Both also write CPU-native graphs (``sdrt/backends/ort_native.py``): ``sdrt export`` from its parity-check
session (``check_session``), ``build-engines --backend ort-cpu`` from each ort-cpu graph (``write_native``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnxruntime as ort

from sdrt.backends import ort_native
from sdrt.manifest import ENGINES_KEY, Manifest, file_record, files_digest

log = logging.getLogger(__name__)

EXTERNAL_DATA_MIN_BYTES = 1024  # initializers at least this big go to the .data file of a large graph
ATTENTION_FUSION = "com.microsoft.MultiHeadAttention"


def plan(backend: str) -> dict:
    """What a build for ``backend`` does (and what its records hold)."""
    if backend == "ort-cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        level, providers = "ORT_ENABLE_EXTENDED", ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif backend == "ort-cuda":
        level, providers = "ORT_ENABLE_BASIC", ["CPUExecutionProvider"]
    else:  # a record without attention_fusion (an older build) is rebuilt, since it no longer matches
        level, providers = "ORT_ENABLE_EXTENDED", ["CPUExecutionProvider"]
    settings = {"flavour": "onnxruntime", "version": ort.__version__, "optimization_level": level,
                "providers": providers}
    return {**settings, "attention_fusion": ATTENTION_FUSION} if backend == "ort-cpu" else settings


def optimize(src: Path, dst_dir: Path, name: str, settings: dict, external: bool) -> tuple[list[str], dict]:
    """Write ``dst_dir/name.onnx`` (+ ``name.onnx.data`` when ``external``); return the file names and
    the record fields this step adds (how many attention blocks were fused, when fusion is planned)."""
    model, fields = str(src), {}
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["optimization_level"])
    options.log_severity_level = 3
    files = ort_native.saving_to(options, dst_dir, name, external, EXTERNAL_DATA_MIN_BYTES)
    if settings.get("attention_fusion") == ATTENTION_FUSION:
        fused, fields["fused_attention"] = _fused_attention(src)
        if fused is not None:  # from memory; its external initializers are still read beside ``src``
            model = fused
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent))
    session = ort.InferenceSession(model, options, providers=settings["providers"])
    del session
    return [f for f in files if (dst_dir / f).is_file()], fields


def _fused_attention(src: Path) -> tuple[bytes | None, int]:
    """The serialized graph of ``src`` with its attention fused (None when nothing matched) and the
    number of blocks fused; external weights are not loaded, the graph keeps pointing at them."""
    import onnx

    from sdrt_export.attention_fusion import fuse_attention

    fused, count = fuse_attention(onnx.load(str(src), load_external_data=False))
    log.info("%s: %d attention block(s) fused into %s", src.stem, count, ATTENTION_FUSION)
    return (fused.SerializeToString() if count else None), count


def check_session(work: Path, name: str, files: list[str]) -> tuple[ort.InferenceSession, dict]:
    """The export's ONNX Runtime parity-check session on ``work/files[0]``, which also writes the
    component's CPU-native graph into ``work/ort-cpu-native``; returns (session, its record minus files'
    digests: source, settings, file names, seconds), so the check runs on the graph the runtime loads."""
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session, names, temp = ort_native.open_saving(work / files[0], options, work, name, ["CPUExecutionProvider"])
    for file in reversed(names):
        (temp / file).replace(work / ort_native.NATIVE / file)
    temp.rmdir()
    return session, {**ort_native.settings(), "source": "onnx", "seconds": round(time.perf_counter() - start, 2),
                     "files": [f"{ort_native.NATIVE}/{f}" for f in names]}


def parity_session(work: Path, name: str, files: list[str], precision: str, scratch: Path) -> tuple:
    """(session, native record or None) for an export's parity check of ``work/files[0]``: fp16 on the
    emulated strongly typed graph (ORT CPU would hide fp16 overflow; no native graph), fp32 ``check_session``."""
    if precision == "fp16":
        from sdrt_export import fp16

        return fp16.emulated_session(work / files[0], scratch), None
    return check_session(work, name, files)


def engines_section(work: Path, results: dict, components: dict, record=file_record) -> dict:
    """``{"engines": {"ort-cpu-native": ...}}`` for the export ``results`` (component -> its ``native``
    record or None) that wrote a native graph, ``{}`` when none did; ``components``: the manifest's;
    ``record(work, rel)``: a file's record (``export --resume`` has them from each component's check)."""
    natives = {n: r["native"] for n, r in results.items() if r.get("native")}
    if not natives:
        return {}
    digests = {n: files_digest(components[n]["files"]) for n in natives}
    return {ENGINES_KEY: {ort_native.NATIVE: native_section(work, natives, digests, record)}}


def native_section(work: Path, records: dict, digests: dict, record=file_record) -> dict:
    """The manifest's ``engines.ort-cpu-native`` section for the graphs ``check_session`` wrote;
    ``digests``: component -> sha256 digest of its exported ONNX files."""
    return {"command": None, "components": {
        name: {**native, "source_sha256": digests[name], "files": [record(work, f) for f in native["files"]]}
        for name, native in records.items()}}


def write_native(manifest: Manifest, name: str, force: bool = False) -> dict | None:
    """Write ``name``'s CPU-native graph from the graph the ort-cpu backend opens for it (its ort-cpu graph,
    else the exported ONNX) unless a current one is there; return the new record (None: kept)."""
    source = ort_native.source_of(manifest, name)
    record = manifest.engines(ort_native.NATIVE).get("components", {}).get(name)
    if record and not force and ort_native.problem(record, *source) is None:
        try:
            for file in record["files"]:
                manifest.check_file(file)
            return None
        except Exception:  # noqa: BLE001 - a damaged native graph is rewritten
            pass
    kind, files = source
    for file in files:
        manifest.check_file(file)
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session, names, work = ort_native.open_saving(manifest.root / files[0]["path"], options, manifest.root, name,
                                                  ["CPUExecutionProvider"])
    del session
    record = ort_native.install(manifest.root, work, names, name, source, time.perf_counter() - start)
    log.info("%s: wrote its %s graph (from the %s graph) in %.1f s", name, ort_native.NATIVE, kind, record["seconds"])
    return record
