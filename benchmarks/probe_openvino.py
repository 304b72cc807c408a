"""The figures behind NOTES.md's "keep OpenVINO's compiled shapes" lever, on one ENGINE_DIR.

    python benchmarks/probe_openvino.py calls ENGINE_DIR [--size 256] [--batch 2] [--runs 3]
    python benchmarks/probe_openvino.py oneshot ENGINE_DIR [--size 256] [--steps 2]

``calls``: one process, the UNet on ``--backend openvino`` (its own precision) and on ort-cpu, warm-up call
each, then alternating calls; prints the precision, the relative L2 between them and each call's seconds.
``oneshot``: whole ``sdrt txt2img --backend openvino`` processes in order: ENGINE_DIR/openvino/ removed
first (compile + save), then kept (import), then ``SDRT_OPENVINO_CACHE=0`` (compile, nothing kept), then
import again; prints wall, CPU and peak RSS (the child's ``ru_maxrss``) and sdrt's stage timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def calls(engines: Path, size: int, batch: int, runs: int) -> None:
    import numpy as np

    from sdrt.backends import open_engine
    from sdrt.manifest import load_manifest

    manifest = load_manifest(engines)
    spec = manifest.specs["unet"]
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal(t.shape(batch, size, size, spec.scale)).astype(t.dtype) for t in spec.inputs}
    feeds["timestep"][...] = 500
    systems = {"openvino": open_engine(manifest, "unet", "openvino", threads=2),
               "ort-cpu": open_engine(manifest, "unet", "ort-cpu", threads=2)}
    out = {name: engine(feeds)[spec.output_names[0]] for name, engine in systems.items()}  # warm-up
    error = np.linalg.norm(out["openvino"] - out["ort-cpu"]) / np.linalg.norm(out["ort-cpu"])
    print(f"openvino precision {systems['openvino'].precision}; relative L2 vs ort-cpu {error:.2e}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for _ in range(runs):
        line = []
        for name, engine in systems.items():
            start = time.perf_counter()
            engine(feeds)
            line.append(f"{name} {time.perf_counter() - start:.3f} s")
        print("  ".join(line), flush=True)


def oneshot(engines: Path, size: int, steps: int) -> None:
    sdrt = str(Path(sys.executable).with_name("sdrt"))
    shutil.rmtree(engines / "openvino", ignore_errors=True)  # its records then no longer match: compiled again
    with tempfile.TemporaryDirectory() as scratch:
        for label, cache in (("compile + save", None), ("import", None), ("compile, nothing kept", "0"),
                             ("import", None)):
            env = {k: v for k, v in os.environ.items() if k != "SDRT_OPENVINO_CACHE"}
            if cache is not None:
                env["SDRT_OPENVINO_CACHE"] = cache
            cmd = [sdrt, "txt2img", "--engines", str(engines), "--backend", "openvino", "--prompt", "a photo of a cat",
                   "--steps", str(steps), "--width", str(size), "--height", str(size), "--seed", "0", "--threads", "2",
                   "--json", "--out", str(Path(scratch) / "image.png")]
            start = time.perf_counter()
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
            stdout = child.stdout.read()
            _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time and peak RSS
            wall = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode:
                raise SystemExit(f"{label}: sdrt txt2img exited {child.returncode}")
            cpu = usage.ru_utime + usage.ru_stime
            timings = json.loads(stdout)["timings_s"]
            stages = ", ".join(f"{k} {sum(v) if isinstance(v, list) else v:.2f}" for k, v in timings.items()
                               if k in ("load", "text_encoder", "unet", "vae_decode"))
            print(f"{label}: {wall:.1f} s wall, {cpu:.1f} CPU-s, peak RSS {usage.ru_maxrss / 2**20:.1f} GiB; "
                  f"{stages}; load average {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("calls", "oneshot"))
    parser.add_argument("engines", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    from sdrt import machine

    print(machine.describe(machine.cpu_info(2)))
    if args.what == "calls":
        calls(args.engines, args.size, args.batch, args.runs)
    else:
        oneshot(args.engines, args.size, args.steps)


if __name__ == "__main__":
    main()
