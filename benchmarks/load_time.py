"""Load time, first calls and whole-process one-shot runs (issue 11, targets 1-3), on an ENGINE_DIR as
`sdrt export` (and optionally `sdrt build-engines --backend ort-cpu`) wrote it, no environment variable.

    python benchmarks/load_time.py load ENGINE_DIR [ENGINE_DIR ...] [--runs 3] [--fresh]
    python benchmarks/load_time.py oneshot --engines ENGINE_DIR --model MODEL_DIR [--steps 2 20] [--runs 2] [--fresh]

``load``: one fresh process per run, ENGINE_DIRs alternating: ``Pipeline(...)`` plus each engine opened in
txt2img order (text encoder, UNet, VAE decoder; this is the ``load`` of ``sdrt txt2img``), each called three
times at 256² (UNet batch 2, as with CFG) right after it opens; first call / median of the other two.
``oneshot``: whole processes alternating ``sdrt txt2img`` and diffusers (``StableDiffusionPipeline`` from
the model folder, same request, same thread count), timed from spawn to exit. Every result carries the CPU
model and flags and the load average before and after it; user+system CPU seconds are kept beside wall
time, since the box is shared. Results go to benchmarks/load_time.json and the generated section of
RESULTS.md between the ``load_time.py`` markers. Findings: benchmarks/NOTES.md, "Load time".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
JSON_PATH, RESULTS = HERE / "load_time.json", HERE / "RESULTS.md"
BEGIN, END = "<!-- load_time.py: begin -->", "<!-- load_time.py: end -->"
ORDER = ("text_encoder", "unet", "vae_decoder")
SIZE, THREADS = 256, 2

DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionPipeline
torch.set_num_threads({threads})
pipe = StableDiffusionPipeline.from_pretrained({model!r}, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=7.5, height={size}, width={size},
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save({out!r})
"""


def machine() -> dict:
    from sdrt.backends.ort_native import cpu_identity

    import onnxruntime

    return {**cpu_identity(), "cores": len(os.sched_getaffinity(0)), "onnxruntime": onnxruntime.__version__}


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def child_load(engine_dir: str) -> dict:
    """One fresh process: open and call each component, timing wall and CPU seconds."""
    start, cpu0, load0 = time.perf_counter(), cpu_seconds(), loadavg()
    import numpy as np

    from sdrt.pipeline import Pipeline

    imported, cpu1 = time.perf_counter(), cpu_seconds()
    pipe = Pipeline(engine_dir, threads=THREADS)
    result = {"engines": engine_dir, "import_s": imported - start, "pipeline_s": pipe.load_seconds,
              "pipeline_cpu_s": cpu_seconds() - cpu1,
              "open_s": {}, "calls_s": {}, "graphs": {}, "load_before": load0}
    rng = np.random.default_rng(0)
    for name in ORDER:
        spec = pipe.manifest.specs[name]
        began, cpu = time.perf_counter(), cpu_seconds()
        engine = pipe.engine(name)
        result["open_s"][name] = time.perf_counter() - began
        result.setdefault("open_cpu_s", {})[name] = cpu_seconds() - cpu
        result["graphs"][name] = Path(engine.session._model_path if hasattr(engine.session, "_model_path")
                                      else "").name or "?"
        batch = 2 if name == "unet" else 1
        feeds = {t.name: (rng.integers(0, 49407, t.shape(batch, SIZE, SIZE, spec.scale)) if "int" in t.dtype
                          else rng.standard_normal(t.shape(batch, SIZE, SIZE, spec.scale))).astype(t.dtype)
                 for t in spec.inputs}
        if "timestep" in feeds:
            feeds["timestep"] = np.full_like(feeds["timestep"], 981)
        calls = []
        for _ in range(3):
            began = time.perf_counter()
            engine(feeds)
            calls.append(time.perf_counter() - began)
        result["calls_s"][name] = calls
    result.update(load_s=pipe.load_seconds, cpu_s=cpu_seconds() - cpu0, load_after=loadavg(),
                  native=sorted(pipe.manifest.engines("ort-cpu-native").get("components", {})),
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return result


def run_load(dirs: list[str], runs: int) -> list[dict]:
    rows = []
    for run in range(runs):
        for engine_dir in dirs:
            env = {k: v for k, v in os.environ.items() if k != "SDRT_ORT_CACHE"}
            done = subprocess.run([sys.executable, __file__, "--child-load", engine_dir], capture_output=True,
                                  text=True, env=env)
            if done.returncode:
                raise SystemExit(f"child failed on {engine_dir}: {done.stderr.strip().splitlines()[-1:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["run"] = run
            rows.append(row)
            first = {n: row["calls_s"][n][0] / sorted(row["calls_s"][n][1:])[0] for n in ORDER}
            print(f"{Path(engine_dir).name} run {run}: load {row['load_s']:.2f} s (import {row['import_s']:.2f}, "
                  + ", ".join(f"{n} {row['open_s'][n]:.2f}" for n in ORDER)
                  + f"; load CPU {sum(row['open_cpu_s'].values()):.2f} s); "
                  + ", ".join(f"{n} first/warm {first[n]:.2f} ({row['calls_s'][n][0]:.2f}/"
                              f"{sorted(row['calls_s'][n][1:])[0]:.2f} s)" for n in ORDER)
                  + f"; load avg {row['load_before']:.1f}->{row['load_after']:.1f}", flush=True)
    return rows


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds from spawn to exit, the child's CPU seconds, its stdout)."""
    before, start = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, cpu_seconds(resource.RUSAGE_CHILDREN) - before, done.stdout


def run_oneshot(engines: str, model: str, steps: list[int], runs: int, backend: str = "ort-cpu") -> list[dict]:
    rows, sdrt = [], str(Path(sys.executable).with_name("sdrt"))
    env = {k: v for k, v in os.environ.items() if k != "SDRT_ORT_CACHE"}
    with tempfile.TemporaryDirectory() as scratch:
        out = str(Path(scratch) / "image.png")
        for run in range(runs):
            for count in steps:
                for system in ("sdrt", "diffusers"):
                    load0 = loadavg()
                    if system == "sdrt":
                        cmd = [sdrt, "txt2img", "--engines", engines, "--prompt", "a photo of a cat", "--steps",
                               str(count), "--guidance", "7.5", "--width", str(SIZE), "--height", str(SIZE),
                               "--seed", "0", "--threads", str(THREADS), "--backend", backend, "--json", "--out", out]
                    else:
                        code = DIFFUSERS.format(threads=THREADS, model=model, steps=count, size=SIZE, out=out)
                        cmd = [sys.executable, "-c", code]
                    wall, cpu, stdout = timed(cmd, env)
                    row = {"system": system, "backend": backend, "steps": count, "run": run, "wall_s": wall,
                           "cpu_s": cpu,
                           "load_before": load0, "load_after": loadavg()}
                    if system == "sdrt":
                        row["timings_s"] = json.loads(stdout)["timings_s"]
                    rows.append(row)
                    print(f"{system} {count} steps run {run}: {wall:.1f} s wall, {cpu:.1f} s CPU"
                          + (f" (load {row['timings_s']['load']:.2f} s)" if system == "sdrt" else "")
                          + f"; load avg {load0:.1f}->{row['load_after']:.1f}", flush=True)
    return rows


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def render(data: dict) -> str:
    m = data["machine"]
    lines = [BEGIN, "## Load, first calls, one-shot processes (generated)", "",
             "Generated by `benchmarks/load_time.py` (do not edit by hand); notes in NOTES.md, \"Load time\". "
             f"SD1.5-shaped random weights, fp32, {SIZE}², {THREADS} threads, no environment variable; CPU: "
             f"{m['model']}, {m['cores']} cores; flags {' '.join(m['flags'])}; onnxruntime {m['onnxruntime']}. "
             "The box is shared: load average before/after each row. One-shot rows on the openvino backend run "
             "OpenVINO's own precision (bf16 on AVX512_BF16 CPUs) from compiled shapes kept by an earlier process.",
             ""]
    if data.get("load"):
        lines += ["| ENGINE_DIR | runs | load p50 (min) | load CPU s p50 | "
                  + " | ".join(f"{n} first/warm p50" for n in ORDER) + " | load avg |",
                  "|---|---|---|---|" + "---|" * len(ORDER) + "---|"]
        for name in dict.fromkeys(Path(r["engines"]).name for r in data["load"]):
            rows = [r for r in data["load"] if Path(r["engines"]).name == name]
            ratios = [median([r["calls_s"][n][0] / median(r["calls_s"][n][1:]) for r in rows]) for n in ORDER]
            loads = [r["load_s"] for r in rows]
            cpu = median([sum(r.get("open_cpu_s", {}).values()) + r.get("pipeline_cpu_s", 0) for r in rows])
            lines.append(f"| {name} | {len(rows)} | {median(loads):.2f} s ({min(loads):.2f}) | {cpu:.2f} | "
                         + " | ".join(f"{x:.2f}" for x in ratios)
                         + f" | {min(r['load_before'] for r in rows):.1f}–{max(r['load_after'] for r in rows):.1f} |")
        lines.append("")
    if data.get("oneshot"):
        lines += ["| sdrt backend | steps | sdrt wall p50 | diffusers wall p50 | ratio (p50) | sdrt CPU s | "
                  "diffusers CPU s | "
                  "CPU ratio | sdrt load p50 | runs | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        shots = data["oneshot"]
        for backend, count in sorted({(r.get("backend", "ort-cpu"), r["steps"]) for r in shots}):
            pairs = [r for r in shots if r["steps"] == count and r.get("backend", "ort-cpu") == backend]
            mine = [r for r in pairs if r["system"] == "sdrt"]
            theirs = [r for r in pairs if r["system"] == "diffusers"]
            if not mine or not theirs:
                continue
            w, tw = median([r["wall_s"] for r in mine]), median([r["wall_s"] for r in theirs])
            c, tc = median([r["cpu_s"] for r in mine]), median([r["cpu_s"] for r in theirs])
            spans = "; ".join(f"{r['system']} {r['load_before']:.1f}→{r['load_after']:.1f}" for r in mine + theirs)
            lines.append(f"| {backend} | {count} | {w:.1f} s | {tw:.1f} s | **{w / tw:.2f}** | {c:.1f} | {tc:.1f} | "
                         f"{c / tc:.2f} | "
                         f"{median([r['timings_s']['load'] for r in mine]):.2f} s | {len(mine)} + {len(theirs)} | "
                         f"{spans} |")
        lines.append("")
    return "\n".join(lines + [END])


def write(section: str, rows: list[dict], fresh: bool = False) -> None:  # section "": re-render only
    """Add ``rows`` to the JSON's ``section`` (``fresh``: replace it) and regenerate the RESULTS.md block."""
    data = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}
    if section:
        data.update({"machine": machine(), section: ([] if fresh else data.get(section, [])) + rows})
    JSON_PATH.write_text(json.dumps(data, indent=1) + "\n")
    text = RESULTS.read_text()
    block = render(data)
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child-load":
        print(json.dumps(child_load(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    load = sub.add_parser("load")
    load.add_argument("engines", nargs="+")
    load.add_argument("--runs", type=int, default=3)
    shot = sub.add_parser("oneshot")
    shot.add_argument("--engines", required=True)
    shot.add_argument("--model", required=True)
    shot.add_argument("--steps", type=int, nargs="+", default=[2, 20])
    shot.add_argument("--runs", type=int, default=2)
    shot.add_argument("--backend", default="ort-cpu", help="sdrt's backend (openvino: its bf16 path on AVX512_BF16 "
                      "CPUs, compiled shapes kept in ENGINE_DIR after the first process)")
    sub.add_parser("render")
    for command in (load, shot):
        command.add_argument("--dry", action="store_true", help="print only; leave the JSON and RESULTS.md alone")
        command.add_argument("--fresh", action="store_true", help="replace this section's earlier rows")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {loadavg():.1f}", flush=True)
    if args.what == "load":
        rows = run_load(args.engines, args.runs)
        args.dry or write("load", rows, args.fresh)
    elif args.what == "oneshot":
        rows = run_oneshot(args.engines, args.model, args.steps, args.runs, args.backend)
        args.dry or write("oneshot", rows, args.fresh)
    else:  # re-render RESULTS.md from the JSON
        write("", [])


if __name__ == "__main__":
    main()
