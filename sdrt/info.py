"""``sdrt info ENGINE_DIR`` and ``sdrt --version``: what an artifact is and what this install can run it with.

Reads ENGINE_DIR/manifest.json only (what ``sdrt export`` and ``sdrt build-engines`` record, see
``sdrt/manifest.py``), plus file hashes with ``--verify``; never imports torch or a backend. Installed
versions come from ``importlib.metadata`` (no import), except ONNX Runtime's providers for ``--version``.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from sdrt.backends import BACKENDS
from sdrt.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from sdrt.specs_kandinsky import CONSTANTS_KEY, PRIOR_SCHEDULER_KEY

# pip distributions per runtime, first match wins for the version; every onnxruntime flavour found is listed
DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
                    "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-training"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
    "tensorrt_rtx": ("tensorrt-rtx", "tensorrt-rtx-cu13", "tensorrt-rtx-cu12"),
    "cupy": ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"),
    "openvino": ("openvino", "openvino-nightly"),
}
FLAVOUR_RUNTIME = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx",
                   "openvino": "openvino"}
KINDS = {"ort-cpu": "optimized graphs", "ort-cuda": "optimized graphs", "tensorrt": "engines",
         "tensorrt-rtx": "engines", "openvino": "compiled models"}


def _installed(names: tuple[str, ...]) -> list[dict]:
    found = []
    for name in names:
        try:
            found.append({"package": name, "version": importlib.metadata.version(name)})
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def installed_versions(providers: bool = False) -> dict:
    """sdrt, Python and each runtime's pip package and version (None when absent); ``providers`` also
    imports onnxruntime for its execution providers."""
    try:
        sdrt_version = importlib.metadata.version("sdrt")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from sdrt import __version__ as sdrt_version
    versions = {"sdrt": sdrt_version, "python": platform.python_version()}
    for runtime, names in DISTRIBUTIONS.items():
        found = _installed(names)
        versions[runtime] = found[0] if found else None
        if runtime == "onnxruntime" and found:
            versions[runtime] = {**found[0], "flavours": [f["package"] for f in found]}
            if providers:
                try:
                    import onnxruntime

                    versions[runtime]["providers"] = onnxruntime.get_available_providers()
                except Exception as exc:  # a broken install: say so instead of failing --version
                    versions[runtime]["providers"] = [f"(import failed: {exc})"]
    return versions


def version_text() -> str:
    """The ``sdrt --version`` lines."""
    v = installed_versions(providers=True)
    lines = [f"sdrt {v['sdrt']} (Python {v['python']})"]
    ort = v["onnxruntime"]
    if ort:
        flavours = ", ".join(ort["flavours"])
        lines.append(f"onnxruntime {ort['version']} ({flavours}; providers: {', '.join(ort.get('providers', []))})")
        if len(ort["flavours"]) > 1:
            lines.append("  warning: several onnxruntime packages are installed; they overwrite each other "
                         "(keep one: pip uninstall ...)")
    else:
        lines.append("onnxruntime: not installed (pip install onnxruntime, or onnxruntime-gpu)")
    for runtime in ("tensorrt", "tensorrt_rtx", "cupy", "openvino"):
        found = v[runtime]
        lines.append(f"{runtime} {found['version']} ({found['package']})" if found else f"{runtime}: not installed")
    return "\n".join(lines)


def _files(records: list[dict]) -> list[dict]:
    return [{"path": r["path"], "size": int(r["size"])} for r in records]


def _all_records(manifest: Manifest) -> list[dict]:
    """Every file record the manifest holds: components, tokenizers, engines and optimized graphs."""
    data = manifest.data
    records = [r for entry in data["components"].values() for r in entry["files"]]
    for key in ("tokenizer", "tokenizer_2", "image_processor"):
        records += data.get(key, {}).get("files") or []
    records += list(data.get(CONSTANTS_KEY, {}).values())  # Kandinsky's negative_image_embeds, clip_mean/std
    for section in data.get("engines", {}).values():
        for record in section["components"].values():
            records += record["files"]
    return records


def verify_files(manifest: Manifest) -> dict:
    """Check every recorded file against its size and sha256; list each problem."""
    problems, total, records = [], 0, _all_records(manifest)
    for record in records:
        path = manifest.root / record["path"]
        total += int(record["size"])
        if not path.is_file():
            problems.append({"path": record["path"], "problem": "missing"})
        elif path.stat().st_size != int(record["size"]):
            problems.append({"path": record["path"],
                             "problem": f"size {path.stat().st_size} bytes, the manifest says {record['size']}"})
        elif sha256_file(path) != record["sha256"]:
            problems.append({"path": record["path"], "problem": "sha256 differs from the manifest"})
    return {"files": len(records), "bytes": total, "ok": not problems, "problems": problems}


def _backend(manifest: Manifest, backend: str, installed: dict) -> dict:
    """What ENGINE_DIR holds for one backend: built engines / optimized graphs and what they were built for."""
    section = manifest.engines(backend)
    records = section.get("components", {})
    names = list(manifest.data["components"])
    info = {"kind": KINDS[backend], "built": [n for n in names if n in records],
            "missing": [n for n in names if n not in records]}
    if backend.startswith("ort") or backend == "openvino":
        info["runs_exported_onnx"] = True  # ort-* backends fall back to the exported ONNX; openvino runs it
    if not records:
        return info
    first = next(iter(records.values()))
    runtime = FLAVOUR_RUNTIME.get(str(first.get("flavour")).replace("-", "_"))
    here = installed.get(runtime) if runtime else None
    info.update({
        "flavour": first.get("flavour"), "version": first.get("version"),
        "installed_version": here["version"] if here else None,
        "stale": [n for n, r in records.items() if n in names and r.get("onnx_sha256") != manifest.onnx_digest(n)],
        "bytes": sum(int(f["size"]) for r in records.values() for f in r["files"]),
        "command": section.get("command"),
    })
    for key in ("compute_capability", "targets", "optimization_level", "providers"):
        if key in first:
            info[key] = first[key]
    return info


def describe(engine_dir, verify: bool = False) -> dict:
    """The ``sdrt info`` report for ENGINE_DIR (``ArtifactError`` for a missing or foreign folder)."""
    manifest = load_manifest(engine_dir)
    data, sizes = manifest.data, manifest.sizes
    installed = installed_versions()
    components = {
        name: {"precision": entry.get("precision", data.get("precision", "fp32")), "files": _files(entry["files"]),
               "bytes": sum(int(r["size"]) for r in entry["files"])}
        for name, entry in data["components"].items()
    }
    tokenizers = {key: {"dir": data[key]["dir"], "files": len(data[key].get("files") or []),
                        "bytes": sum(int(r["size"]) for r in data[key].get("files") or [])}
                  for key in ("tokenizer", "tokenizer_2") if key in data}
    scheduler = data["scheduler"]
    report = {
        "engine_dir": str(Path(manifest.root).absolute()),
        "family": data["family"],
        "pipeline": data.get("pipeline", {}).get("class_name"),
        "precision": data.get("precision", "fp32"),
        "sizes": {"min": sizes.min_size, "opt": sizes.opt_size, "max": sizes.max_size, "multiple_of":
                  manifest.dims.vae_scale_factor},
        "batch": {"min": 1, "max": sizes.max_batch},
        "scheduler": {"class_name": scheduler.get("_class_name"), "prediction_type": scheduler.get("prediction_type",
                      "epsilon"), "timestep_spacing": scheduler.get("timestep_spacing", "leading")},
        "components": components,
        "tokenizers": tokenizers,
        "constants": {name: {"path": r["path"], "shape": r.get("shape"), "bytes": int(r["size"])}
                      for name, r in data.get(CONSTANTS_KEY, {}).items()},
        "backends": {backend: _backend(manifest, backend, installed) for backend in BACKENDS},
        "loras": list(data.get("loras") or []),
        "exported": {"sdrt_version": data.get("sdrt_version"), "source": data.get("source", {}).get("path"),
                     "opset": data.get("opset"), "exporter": data.get("exporter"),
                     "versions": data.get("versions", {})},
    }
    if PRIOR_SCHEDULER_KEY in data:  # Kandinsky 2.2: the prior's UnCLIPScheduler (``scheduler`` is the decoder's)
        prior = data[PRIOR_SCHEDULER_KEY]
        report["prior_scheduler"] = {"class_name": prior.get("_class_name"),
                                     "prediction_type": prior.get("prediction_type", "epsilon"),
                                     "variance_type": prior.get("variance_type")}
    if verify:
        report["verify"] = verify_files(manifest)
        report["failed"] = not report["verify"]["ok"]
    report["message"] = format_report(report)
    return report


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _lora(entry) -> str:
    if isinstance(entry, dict):
        name = entry.get("name") or entry.get("path") or "?"
        return f"{name} (scale {entry['scale']})" if "scale" in entry else str(name)
    return str(entry)


def _backend_line(backend: str, b: dict) -> str:
    onnx = b.get("runs_exported_onnx")
    if not b["built"]:
        return f"no {b['kind']}" + (" (runs the exported ONNX)" if onnx else
                                    f" (build them: sdrt build-engines --backend {backend} ...)")
    where = [f"{b['flavour']} {b['version']}"]
    if b.get("compute_capability"):
        where.append(f"GPU compute capability {b['compute_capability']}")
    targets = b.get("targets")
    if targets:  # TensorRT-RTX: a list of compute capabilities, or "default" (its own choice)
        where.append("GPU targets " + (",".join(t.lower() for t in targets) if isinstance(targets, list) else targets))
    if b.get("optimization_level"):
        where.append(f"{b['optimization_level']}, {', '.join(b.get('providers') or [])}")
    text = f"{b['kind']} for {'; '.join(where)}: {len(b['built'])}/{len(b['built']) + len(b['missing'])} " \
           f"components, {_mb(b['bytes'])}"
    if b["installed_version"] != b["version"]:
        text += f"; installed here: {b['installed_version'] or 'none'}" + (
            ", so the exported ONNX runs" if onnx else ", so these engines cannot run here")
    if b["stale"]:
        text += f"; stale (built from an older ONNX): {', '.join(b['stale'])}"
    return text


def format_report(r: dict) -> str:
    """The human-readable ``sdrt info`` text."""
    sizes, batch, sched, exp = r["sizes"], r["batch"], r["scheduler"], r["exported"]
    precisions = sorted({c["precision"] for c in r["components"].values()})
    details = [f"opset {exp['opset']}"] if exp["opset"] else []
    details += [f"{exp['exporter']} exporter"] if exp["exporter"] else []
    details += [", ".join(f"{k} {v}" for k, v in exp["versions"].items())] if exp["versions"] else []
    lines = [
        f"{r['engine_dir']}",
        f"  family      {r['family']}" + (f" ({r['pipeline']})" if r["pipeline"] else ""),
        f"  precision   {r['precision']}" + (" (mixed: " + ", ".join(
            f"{n} {c['precision']}" for n, c in r["components"].items()) + ")" if len(precisions) > 1 else ""),
        f"  sizes       {sizes['min']}..{sizes['max']} px per side, multiples of {sizes['multiple_of']} "
        f"(opt {sizes['opt']}); batch {batch['min']}..{batch['max']}",
        f"  scheduler   {sched['class_name']} ({sched['prediction_type']}, {sched['timestep_spacing']} spacing); "
        "--scheduler picks another",
        *([f"  prior       {r['prior_scheduler']['class_name']} ({r['prior_scheduler']['prediction_type']}, "
           f"{r['prior_scheduler']['variance_type']} variance); --prior-steps, --prior-guidance"]
          if r.get("prior_scheduler") else []),
        f"  LoRAs       {', '.join(_lora(x) for x in r['loras']) or 'none'}",
        f"  exported    by sdrt {exp['sdrt_version']} from {exp['source']}"
        + (f" ({'; '.join(details)})" if details else ""),
        "  components",
    ]
    w = max([15] + [len(n) for key in ("components", "tokenizers", "constants") for n in r.get(key, {})])
    for name, c in r["components"].items():
        files = ", ".join(f["path"] for f in c["files"])
        lines.append(f"    {name:<{w}} {c['precision']:<5} {_mb(c['bytes']):>9}  {files}")
    for name, t in r["tokenizers"].items():
        lines.append(f"    {name:<{w}} {'':<5} {_mb(t['bytes']):>9}  {t['dir']}/ ({t['files']} files)")
    for name, c in r.get("constants", {}).items():
        shape = "x".join(str(n) for n in c["shape"] or [])
        lines.append(f"    {name:<{w}} {'':<5} {_mb(c['bytes']):>9}  {c['path']} ({shape} float32)")
    lines.append("  backends")
    for backend, b in r["backends"].items():
        lines.append(f"    {backend:<15} {_backend_line(backend, b)}")
    if "verify" in r:
        v = r["verify"]
        if v["ok"]:
            lines.append(f"  files       all {v['files']} match their sha256 in {MANIFEST_NAME} ({_mb(v['bytes'])})")
        else:
            lines.append(f"  files       {len(v['problems'])} of {v['files']} do not match {MANIFEST_NAME} "
                         "(modified or corrupt; re-run `sdrt export --force` or `sdrt build-engines`):")
            lines += [f"    {p['path']}: {p['problem']}" for p in v["problems"]]
    return "\n".join(lines)
