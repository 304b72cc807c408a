"""Probe one ONNX Runtime session-option lever on an artifact's UNet, in a fresh process per lever.

    python benchmarks/probe_ort.py ENGINE_DIR [--levers baseline,no_arena,...] [--size 256] [--calls 3]
        [--onnx GRAPH.onnx --tag NAME] [--compare TAG]

Prints one JSON line per lever: session creation seconds, seconds per UNet call (batch 2, i.e. one
CFG step) and the process's peak RSS. ``save_optimized`` writes the optimized graph next to a copy
of nothing (under --work); ``load_optimized`` then opens that file with graph optimization off.
``--onnx`` opens another UNet graph with the same inputs instead of ENGINE_DIR/unet.onnx (e.g. the
attention-fused ``ENGINE_DIR/ort-cpu/unet.onnx`` that ``sdrt build-engines --backend ort-cpu`` writes);
each run saves its first output as ``--work/TAG-SIZE.npy``, and ``--compare TAG`` adds the relative L2
error against the run saved under that tag. Findings go to benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LEVERS = ("baseline", "no_arena", "no_mem_pattern", "no_prepack", "no_spin", "save_optimized", "load_optimized")


def options(lever: str, threads: int, work: Path):
    import onnxruntime as ort

    from sdrt.backends.ort import session_options

    opts = session_options(threads)
    if lever == "no_arena":
        opts.enable_cpu_mem_arena = False
    elif lever == "no_mem_pattern":
        opts.enable_mem_pattern = False
    elif lever == "no_prepack":
        opts.add_session_config_entry("session.disable_prepacking", "1")
    elif lever == "no_spin":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif lever == "save_optimized":
        opts.optimized_model_filepath = str(work / "unet.opt.onnx")
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "unet.opt.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    elif lever == "load_optimized":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def probe(engine_dir: Path, lever: str, size: int, calls: int, threads: int, work: Path, onnx: Path | None = None,
          tag: str | None = None, compare: str | None = None) -> dict:
    import numpy as np
    import onnxruntime as ort

    path = work / "unet.opt.onnx" if lever == "load_optimized" else onnx or engine_dir / "unet.onnx"
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options(lever, threads, work), providers=["CPUExecutionProvider"])
    created = time.perf_counter() - start
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rng = np.random.default_rng(0)
    text = json.loads((engine_dir / "manifest.json").read_text())["dims"]
    feeds = {"sample": rng.standard_normal((2, 4, size // 8, size // 8), dtype=np.float32),
             "timestep": np.full(2, 981.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, text.get("text_hidden_size", 768)),
                                                          dtype=np.float32)}
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        out = session.run(None, feeds)[0]
        seconds.append(time.perf_counter() - start)
    result = {"lever": lever, "tag": tag or lever, "size": size, "create_s": round(created, 2),
              "call_s": [round(s, 3) for s in seconds], "peak_rss_after_load_gib": round(rss_after_load / 2**30, 2),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    np.save(work / f"{tag or lever}-{size}.npy", out)
    if compare:
        want = np.load(work / f"{compare}-{size}.npy").astype(np.float64)
        result[f"rel_l2_vs_{compare}"] = float(np.linalg.norm(out - want) / np.linalg.norm(want))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench/probe"))
    parser.add_argument("--onnx", type=Path, help="UNet graph to open instead of ENGINE_DIR/unet.onnx")
    parser.add_argument("--tag", help="name of this run (output file, JSON); default: the lever")
    parser.add_argument("--compare", help="tag of an earlier run at this size to compare the output with")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(probe(args.engine_dir, args.one, args.size, args.calls, args.threads, args.work,
                               args.onnx, args.tag, args.compare)))
        return
    for lever in args.levers.split(","):
        cmd = [sys.executable, __file__, str(args.engine_dir), "--one", lever, "--size", str(args.size),
               "--calls", str(args.calls), "--threads", str(args.threads), "--work", str(args.work)]
        for flag in ("onnx", "tag", "compare"):
            if getattr(args, flag):
                cmd += [f"--{flag}", str(getattr(args, flag))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        print(done.stdout.strip() or json.dumps({"lever": lever, "error": done.stderr.strip().splitlines()[-1:]}),
              flush=True)


if __name__ == "__main__":
    main()
