"""Experiments behind NOTES.md § Loop overhead: where a step's time outside the UNet goes.

    python benchmarks/probe_loop.py loop ENGINE_DIR [--stub [--churn]] [--mallopt] [--steps N --runs R]
    python benchmarks/probe_loop.py cold ENGINE_DIR [--no-spin]

``loop``: loop overhead per step of the pipeline (256x256, CFG, 2 threads) for a few schedulers, with
the real UNet or (``--stub``) a function returning a fixed array. ``--churn`` makes the stub allocate
and free 50 x 1 MB per call (heap churn) and stream 128 MB (cache eviction), as a simulated engine
call; ``--mallopt`` raises glibc's trim and mmap thresholds first (the heap lever).
``cold``: times the CFG combination ``u + 7.5 * (c - u)`` on the UNet's output right after
``session.run``, then warm, then after a 50 ms sleep (the ort-cpu UNet graph when the manifest
records one, else the exported one; 2 threads, batch 2, 256x256).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import time

import numpy as np


def loop(args) -> None:
    if args.mallopt:  # M_TRIM_THRESHOLD (-1) 256 MB, M_MMAP_THRESHOLD (-3) 32 MB
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-1, 256 << 20), libc.mallopt(-3, 32 << 20)
    from sdrt.pipeline import Pipeline
    from sdrt.specs import UNET

    pipe = Pipeline(args.engine_dir, threads=2)
    junk = [np.ones(1 << 22, np.float32) for _ in range(8)] if args.churn else []

    def unet(feeds):
        for block in junk:
            block += 1.0
        scratch = [np.empty(1 << 18, np.float32) for _ in range(50 if args.churn else 0)]
        for block in scratch:
            block[::1024] = 1
        sample = feeds["sample"]
        return {"out_sample": np.full((sample.shape[0], 4) + sample.shape[2:], 0.1, np.float32)}

    if args.stub:
        pipe._engines[UNET] = unet
    for scheduler in args.schedulers.split(","):
        per_step = sorted(pipe.txt2img("a cat", steps=args.steps, seed=r, width=256, height=256, scheduler=scheduler)
                          .timings["loop_overhead"] / args.steps * 1e6 for r in range(args.runs))
        print(f"{scheduler:18s} loop overhead per step: min {per_step[0]:.1f} µs, "
              f"median {per_step[len(per_step) // 2]:.1f} µs ({args.runs} runs of {args.steps} steps)")


def cold(args) -> None:
    import onnxruntime as ort

    from sdrt.backends.ort import session_options
    from sdrt.manifest import load_manifest

    manifest = load_manifest(args.engine_dir)
    record = manifest.engines("ort-cpu").get("components", {}).get("unet")
    path = manifest.verified_engine("ort-cpu", "unet")[0] if record else manifest.verified_path("unet")
    options = session_options(2)
    if args.no_spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    dims, rng = manifest.dims, np.random.default_rng(0)
    feeds = {"sample": rng.random((2, dims.unet_in_channels, 32, 32), np.float32),
             "timestep": np.full(2, 500, np.float32),
             "encoder_hidden_states": rng.random((2, dims.text_max_length, dims.cross_attention_dim), np.float32)}
    for _ in range(4):
        out = session.run(["out_sample"], feeds)[0]
        times = []
        for _ in range(4):
            start = time.perf_counter()
            uncond, cond = out[:1], out[1:]
            uncond + 7.5 * (cond - uncond)
            times.append((time.perf_counter() - start) * 1e6)
        time.sleep(0.05)
        start = time.perf_counter()
        uncond + 7.5 * (cond - uncond)
        slept = (time.perf_counter() - start) * 1e6
        print("CFG combination after session.run, µs:", [round(t, 1) for t in times], f"after 50 ms sleep: {slept:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("loop", "cold"))
    parser.add_argument("engine_dir")
    parser.add_argument("--stub", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--schedulers", default="PNDMScheduler,Euler,DPM++ 2M Karras,Euler a")
    parser.add_argument("--mallopt", action="store_true")
    parser.add_argument("--churn", action="store_true")
    parser.add_argument("--no-spin", action="store_true")
    args = parser.parse_args()
    (loop if args.mode == "loop" else cold)(args)


if __name__ == "__main__":
    main()
