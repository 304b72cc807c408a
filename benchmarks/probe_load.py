"""Where a CPU-native graph's load and first call go: one lever per fresh process, on one component.

    python benchmarks/probe_load.py ENGINE_DIR [--component unet] [--levers default,no_arena,...] [--calls 3]

Per lever: the BLAKE3 check of the component's native files (wall and CPU s), session creation (wall, CPU,
page faults), then ``--calls`` calls at 256² (UNet batch 2) with their minor page faults. Levers are ONNX
Runtime session options on the native graph (``sdrt/backends/ort_native.py``); ``prepacked`` writes a
variant with ``session.save_external_prepacked_constant_initializers`` once under --work and loads that.
Findings: benchmarks/NOTES.md, "Load time".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LEVERS = ("default", "no_arena", "no_prepack", "env_allocators", "warmup_small", "prepacked", "no_spin")


def usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt + r.ru_majflt


def probe(root: Path, component: str, lever: str, calls: int, work: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    from sdrt.backends.ort import native_options
    from sdrt.backends.ort_native import NATIVE, open_saving
    from sdrt.manifest import load_manifest

    manifest = load_manifest(root)
    record = manifest.engines(NATIVE)["components"][component]
    out = {"lever": lever, "component": component, "load_before": float(Path("/proc/loadavg").read_text().split()[0])}
    wall, (cpu, faults) = time.perf_counter(), usage()
    for file in record["files"]:
        manifest.check_file(file)
    out["check_s"], out["check_cpu_s"] = time.perf_counter() - wall, usage()[0] - cpu
    path = root / record["files"][0]["path"]
    if lever == "prepacked":
        path = work / f"{component}-prepacked" / f"{component}.onnx"
        if not path.is_file():
            options = ort.SessionOptions()
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            session, names, temp = open_saving(root / manifest.component(component)["files"][0]["path"], options,
                                               work, component, ["CPUExecutionProvider"])
            del session
            temp.rename(path.parent)
    options = native_options(2)
    if lever == "no_arena":
        options.enable_cpu_mem_arena = False
    elif lever == "no_prepack":
        options.add_session_config_entry("session.disable_prepacking", "1")
    elif lever == "env_allocators":
        options.add_session_config_entry("session.use_env_allocators", "1")
    elif lever == "no_spin":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wall, (cpu, faults) = time.perf_counter(), usage()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    after = usage()
    out.update(session_s=time.perf_counter() - wall, session_cpu_s=after[0] - cpu, session_faults=after[1] - faults,
               rss_after_session_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    spec = manifest.specs[component]
    rng = np.random.default_rng(0)

    def feeds(size: int):
        batch = 2 if component == "unet" else 1
        return {t.name: (rng.integers(0, 49407, t.shape(batch, size, size, spec.scale)) if "int" in t.dtype
                         else rng.standard_normal(t.shape(batch, size, size, spec.scale))).astype(t.dtype)
                for t in spec.inputs}

    if lever == "warmup_small":
        wall = time.perf_counter()
        session.run(None, feeds(64))
        out["warmup_s"] = time.perf_counter() - wall
    out["calls_s"], out["call_faults"] = [], []
    big = feeds(256)
    for _ in range(calls):
        wall, (cpu, faults) = time.perf_counter(), usage()
        session.run(None, big)
        out["calls_s"].append(round(time.perf_counter() - wall, 3))
        out["call_faults"].append(usage()[1] - faults)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/probe_load"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(probe(args.engine_dir, args.component, args.one, args.calls, args.work)))
        return
    for lever in args.levers.split(","):
        done = subprocess.run([sys.executable, __file__, str(args.engine_dir), "--component", args.component,
                               "--one", lever, "--calls", str(args.calls), "--work", str(args.work)],
                              capture_output=True, text=True)
        print(done.stdout.strip() or json.dumps({"lever": lever, "error": done.stderr.strip().splitlines()[-3:]}),
              flush=True)


if __name__ == "__main__":
    main()
