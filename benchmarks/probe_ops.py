"""Where one component's ONNX Runtime call spends its time, by operator type (ORT's profiler).

    python benchmarks/probe_ops.py ENGINE_DIR [--component unet] [--size 256] [--batch 2] [--threads 2]

Opens the component's CPU-native graph (else its exported ONNX), runs it twice on random inputs at the
size, and prints the second run's kernel time per operator type (NOTES.md, "Load time", target 3).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="2: a CFG UNet call")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import onnxruntime as ort

    from sdrt import machine
    from sdrt.backends.ort import native_options, session_options
    from sdrt.manifest import load_manifest

    manifest = load_manifest(args.engines)
    spec = manifest.specs[args.component]
    native = manifest.engines("ort-cpu-native").get("components", {}).get(args.component)
    path = args.engines / (native or manifest.component(args.component))["files"][0]["path"]
    options = native_options(args.threads) if native else session_options(args.threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ops")
    session = ort.InferenceSession(str(path), options)
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec.inputs:
        shape = t.shape(args.batch, args.size, args.size, spec.scale)
        feeds[t.name] = (rng.integers(0, 49407, shape) if "int" in t.dtype else rng.standard_normal(shape)).astype(t.dtype)
    if "timestep" in feeds:
        feeds["timestep"][...] = 981
    print(machine.describe(machine.cpu_info(args.threads)), f"; {path.relative_to(args.engines)}")
    for run in range(2):
        start = time.perf_counter()
        session.run(None, feeds)
        print(f"run {run}: {time.perf_counter() - start:.2f} s")
    events = json.loads(Path(session.end_profiling()).read_text())
    last = max(e["ts"] for e in events if e.get("name") == "model_run")
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    overall = sum(total.values())
    for op, us in total.most_common(15):
        print(f"{op:28s} {us / 1e3:9.1f} ms {100 * us / overall:5.1f} %  ({count[op]} nodes)")


if __name__ == "__main__":
    main()
