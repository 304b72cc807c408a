"""End to end with the tiny VAE (TAESD) vs the full VAE: SD-Turbo-shaped, 512x512, 1 step, guidance 0.

Builds once (in WORK, default /tmp/sdrt-tiny-vae-bench): a random-weight SD2.1-shaped pipeline
(``make-model --arch sd2``) with stabilityai/sd-turbo's scheduler (trailing Euler a), a random TAESD
(``--arch taesd``), and ``sdrt export --tiny-vae`` of both at 512 only, batch 1. Then in one process,
``Pipeline.txt2img(..., vae="full")`` and ``vae="tiny"`` alternate (after one untimed warm-up each, which
opens the engines), so machine load drifts over both. Prints the CPU, the load and per-stage medians.

    .venv/bin/python benchmarks/tiny_vae.py [--runs 3] [--threads 2] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def cpu_info() -> dict:
    """CPU model, cores, SIMD flags and load average (sdrt.machine, shared by every benchmark)."""
    from sdrt import machine

    info = machine.cpu_info()
    return {"model": info["model"], "cores": info["logical_cpus"], "flags": info["flags"],
            "loadavg": info["load_average"]}


def build(work: Path) -> Path:
    from sdrt.specs import SizeRange
    from sdrt_export.archs import TURBO_SCHEDULER
    from sdrt_export.exporter import export_model
    from sdrt_export.make_model import make_model

    engines = work / "engines"
    if (engines / "manifest.json").is_file():
        return engines
    model = work / "sd-turbo"
    if not (model / "model_index.json").is_file():
        make_model(model, arch="sd2", seed=0, force=True)
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER, indent=2))
    taesd = work / "taesd"
    if not (taesd / "config.json").is_file():
        make_model(taesd, arch="taesd", seed=0, force=True)
    start = time.perf_counter()
    export_model(model, engines, sizes=SizeRange(512, 512, 512, 1), progress=False, tiny_vae_dir=taesd, force=True)
    print(f"exported in {time.perf_counter() - start:.0f} s")
    return engines


def work_tflop(engines: Path) -> dict:
    """Each stage's arithmetic at 512², batch 1, counted once from the artifact's ONNX (export/flops.py)."""
    from sdrt.manifest import load_manifest
    from sdrt_export.flops import graph_flops

    manifest = load_manifest(engines)
    stages = {"text_encoder": "text_encoder", "unet": "unet", "full": "vae_decoder", "tiny": "tiny_vae_decoder"}
    return {stage: graph_flops(manifest.verified_path(name), manifest.specs[name].shapes(1, 512, 512))["total"] / 1e12
            for stage, name in stages.items()}


def stage_seconds(result) -> dict:
    t = result.timings
    return {"text_encoder": sum(v for k, v in t.items() if k.startswith("text_encoder")),
            "unet": sum(t.get("unet", [])), "vae_decode": t.get("vae_decode", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdrt-tiny-vae-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    engines = build(args.work)

    from sdrt.pipeline import Pipeline

    pipe = Pipeline(engines, threads=args.threads)
    request = dict(prompt="a photo of a cat", steps=1, guidance=0.0, seed=0, width=512, height=512)
    print("cpu:", cpu_info())
    samples = {"full": [], "tiny": []}
    for vae in samples:  # warm-up: opens every engine the run needs
        pipe.txt2img(vae=vae, **request)
    for _ in range(args.runs):
        for vae in samples:
            start = time.perf_counter()
            result = pipe.txt2img(vae=vae, **request)
            samples[vae].append({"total": time.perf_counter() - start, **stage_seconds(result)})
    medians = {vae: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for vae, runs in samples.items()}
    for vae, m in medians.items():
        print(f"{vae:>4} VAE: end to end {m['total']:6.2f} s  (text encoder {m['text_encoder']:.2f}, "
              f"UNet {m['unet']:.2f}, VAE decode {m['vae_decode']:.2f})  runs: "
              + ", ".join(f"{s['total']:.2f}" for s in samples[vae]))
    flop = work_tflop(engines)
    common = flop["text_encoder"] + flop["unet"]
    floor = (common + flop["tiny"]) / (common + flop["full"])
    print("work, TFLOP: " + ", ".join(f"{k} {v:.3f}" for k, v in flop.items())
          + f"; tiny / full at equal FLOP rates: {floor:.3f}")
    ratio = medians["tiny"]["total"] / medians["full"]["total"]
    decode = medians["tiny"]["vae_decode"] / medians["full"]["vae_decode"]
    print(f"tiny / full: end to end {ratio:.3f} (target <= 0.25), VAE decode alone {decode:.3f}")
    print("loadavg after:", os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_info(), "samples": samples, "medians": medians,
                                         "ratio_end_to_end": ratio, "ratio_decode": decode,
                                         "tflop": flop, "ratio_at_equal_flop_rates": floor}, indent=2) + "\n")


if __name__ == "__main__":
    main()
