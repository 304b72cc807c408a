"""CPU-native graphs: each component's graph as ONNX Runtime's ORT_ENABLE_ALL optimizer leaves it for
this CPU, saved once (by ``sdrt export`` and ``sdrt build-engines --backend ort-cpu``) so a session loads
it with optimization off and memory-maps its weights instead of re-optimizing at every start
(benchmarks/NOTES.md, "Load time").

ENABLE_ALL adds layout transforms (NCHWc blocks sized for the CPU's vector width) and kernels chosen
for its instruction set, so a graph is only valid for the ONNX Runtime version and CPU that wrote it.
Both are recorded with it (``engines.ort-cpu-native`` in the manifest: version, CPU model and
instruction-set flags, and the digest of the graph it was optimized from); a record that differs from
this process is refused with a warning, the portable graph is opened instead and, when ENGINE_DIR is
writable, the native graph is rewritten from it by that same session (the rebuild costs one save).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from sdrt.backends.records import cpu_identity, locked_manifest, writable  # cpu_identity: re-exported
from sdrt.manifest import ENGINES_KEY, Manifest, file_record, files_digest

log = logging.getLogger(__name__)

NATIVE = "ort-cpu-native"  # the manifest's engines key and the folder in ENGINE_DIR
LEVEL = "ORT_ENABLE_ALL"
EXTERNAL_MIN_BYTES = 1024  # initializers this big go to the .data file, which ORT writes page-aligned

def settings() -> dict:
    """What a native graph written by this process records, besides its files and source."""
    return {"flavour": "onnxruntime", "version": ort.__version__, "optimization_level": LEVEL, "cpu": cpu_identity()}


def source_of(manifest: Manifest, component: str) -> tuple[str, list[dict]]:
    """The portable graph the ort-cpu backend opens for ``component``: ``("ort-cpu", files)`` for a graph
    ``sdrt build-engines --backend ort-cpu`` wrote with this ONNX Runtime, else ``("onnx", files)``."""
    record = manifest.engines("ort-cpu").get("components", {}).get(component)
    if record and record.get("version") == ort.__version__ and record.get("onnx_sha256") == \
            manifest.onnx_digest(component):
        return "ort-cpu", record["files"]
    return "onnx", manifest.component(component)["files"]


def problem(record: dict, kind: str, files: list[dict]) -> str | None:
    """Why a native graph record cannot be used here (None when it can)."""
    here = settings()
    if record.get("source") != kind or record.get("source_sha256") != files_digest(files):
        return f"it was optimized from another graph ({record.get('source')}), this run opens the {kind} graph"
    if record.get("version") != here["version"]:
        return f"it was written by onnxruntime {record.get('version')}, this is {here['version']}"
    cpu = record.get("cpu") or {}
    if cpu.get("model") != here["cpu"]["model"] or cpu.get("flags") != here["cpu"]["flags"]:
        missing = sorted(set(cpu.get("flags") or ()) - set(here["cpu"]["flags"]))
        return (f"it was written on another CPU ({cpu.get('model')}"
                + (f"; this one lacks {', '.join(missing[:6])}" if missing else "") + f"), this is {here['cpu']['model']}")
    return None


def save_options(options: ort.SessionOptions, work: Path, name: str, external: bool) -> list[str]:
    """Make ``options`` save the ENABLE_ALL graph as ``work/name.onnx`` (+ ``.data``, also for graphs that
    fit in one file: weights in a page-aligned data file are memory-mapped at load, not parsed and copied);
    return the file names."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return saving_to(options, work, name, external, EXTERNAL_MIN_BYTES)


def saving_to(options: ort.SessionOptions, folder: Path, name: str, external: bool, min_bytes: int) -> list[str]:
    """Make the session ``options`` open write its optimized graph to ``folder/name.onnx``, initializers of
    ``min_bytes`` or more to ``name.onnx.data`` when ``external``; return the file names."""
    options.optimized_model_filepath = str(folder / f"{name}.onnx")
    files = [f"{name}.onnx"]
    if external:
        files.append(f"{name}.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", files[1])
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(min_bytes))
    return files


def open_saving(model, options: ort.SessionOptions, root: Path, name: str, providers: list,
                external: bool = True) -> tuple[ort.InferenceSession, list[str], Path]:
    """Create a session on ``model`` that also writes its native graph into a temp folder under
    ``root/ort-cpu-native``; return (session, file names, temp folder). The caller moves the files."""
    folder = root / NATIVE
    folder.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        files = save_options(options, work, name, external)
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return session, [f for f in files if (work / f).is_file()], work


def install(root: Path, work: Path, names: list[str], name: str, source: tuple[str, list[dict]], seconds: float,
            command: str | None = None) -> dict:
    """Move a written native graph from ``work`` into ``root/ort-cpu-native`` and record it in the manifest
    (under an exclusive lock, so concurrent processes never interleave files and records); return the record."""
    folder = root / NATIVE
    try:
        with locked_manifest(root, folder) as data:
            for file in reversed(names):  # the data first, the graph that points at it last
                os.replace(work / file, folder / file)
            kind, files = source
            record = {**settings(), "source": kind, "source_sha256": files_digest(files), "seconds": round(seconds, 2),
                      "files": [file_record(root, f"{NATIVE}/{f}") for f in names]}
            section = data.setdefault(ENGINES_KEY, {}).get(NATIVE) or {}
            data[ENGINES_KEY][NATIVE] = {**section, "command": command or section.get("command"),
                                         "components": {**section.get("components", {}), name: record}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def rebuild(manifest: Manifest, component: str, path: Path, source: tuple[str, list[dict]],
            options: ort.SessionOptions, providers: list) -> ort.InferenceSession | None:
    """Open ``path`` (the verified portable graph) and rewrite the native graph from that session; None
    when ENGINE_DIR cannot be written (the caller opens ``path`` plainly)."""
    if not writable(manifest.root):
        log.info("%s: %s is read-only; its %s graph is not rewritten", component, manifest.root, NATIVE)
        return None
    start = time.perf_counter()
    try:
        session, names, work = open_saving(path, options, manifest.root, component, providers)
        record = install(manifest.root, work, names, component, source, time.perf_counter() - start)
    except OSError as exc:
        log.warning("%s: cannot rewrite its %s graph in %s (%s)", component, NATIVE, manifest.root, exc.strerror or exc)
        return None
    manifest.data.setdefault(ENGINES_KEY, {}).setdefault(NATIVE, {"components": {}})["components"][component] = record
    log.warning("%s: rewrote its %s graph for this CPU and onnxruntime %s in %.1f s", component, NATIVE,
                ort.__version__, time.perf_counter() - start)
    return session
