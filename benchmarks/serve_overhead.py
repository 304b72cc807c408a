"""What ``sdrt serve`` adds over the in-process Pipeline: the same txt2img request through HTTP
(``POST /sdapi/v1/txt2img`` on a ``sdrt serve`` subprocess, 127.0.0.1) and through ``Pipeline.txt2img`` in
this process, alternating, same thread count; p50/p99 of the paired differences (HTTP minus in-process).

    .venv/bin/python benchmarks/serve_overhead.py --tiny --runs 40 [--results benchmarks/RESULTS.md]
    .venv/bin/python benchmarks/serve_overhead.py --sd15-shaped --runs 10 --steps 2   # ~4 GB, minutes to build
    .venv/bin/python benchmarks/serve_overhead.py --engines engines/tiny --runs 40

The difference holds JSON parsing, the queue hop, PNG encoding with the parameters chunk, base64, the
response and the client; both sides decode the same latents, so engine time cancels out up to noise.
Writes its section of RESULTS.md between its markers (the rest of the file is left as it is).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- serve_overhead:begin -->", "<!-- serve_overhead:end -->"


def cpu() -> dict:
    """CPU model, usable cores and the SIMD flags that matter to ONNX Runtime's kernels (sdrt.machine)."""
    from sdrt.machine import cpu_info

    info = cpu_info()
    return {"model": info["model"], "cores": info["usable_cpus"], "flags": info["flags"]}


def build_artifact(arch: str, out: Path) -> Path:
    from sdrt.specs import SizeRange
    from sdrt_export.exporter import export_model
    from sdrt_export.make_model import make_model

    sizes = SizeRange(64, 128, 256, 2) if arch == "tiny" else SizeRange(256, 256, 512, 1)
    model = make_model(out / "model", arch=arch, seed=0)
    export_model(model, out / "engines", sizes=sizes, progress=False)
    return out / "engines"


def start_server(engines: Path, threads: int):
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--engines", str(engines), "--port", "0",
                             "--threads", str(threads)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if match:  # keep draining its log so the pipe never fills
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"http://127.0.0.1:{match[1]}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("sdrt serve did not start")


def measure(engines: Path, runs: int, steps: int, size: int, threads: int, warmup: int) -> dict:
    import httpx
    import numpy as np
    from PIL import Image

    from sdrt.pipeline import Pipeline

    proc, url = start_server(engines, threads)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            while client.get("/readyz").status_code != 200:
                time.sleep(0.2)
            pipe = Pipeline(engines, threads=threads)
            body = {"prompt": "a photo of a cat", "steps": steps, "seed": 42, "width": size, "height": size,
                    "cfg_scale": 7.5, "sampler_name": "Euler a"}
            http_s, local_s = [], []
            for i in range(warmup + runs):
                start = time.perf_counter()
                response = client.post("/sdapi/v1/txt2img", json=body)
                t_http = time.perf_counter() - start
                assert response.status_code == 200, response.text
                start = time.perf_counter()
                result = pipe.txt2img("a photo of a cat", steps=steps, seed=42, width=size, height=size,
                                      guidance=7.5, scheduler="Euler a")
                t_local = time.perf_counter() - start
                if i == 0:  # the same pixels both ways
                    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
                    assert np.array_equal(served, result.images[0]), "HTTP and in-process images differ"
                if i >= warmup:
                    http_s.append(t_http)
                    local_s.append(t_local)
    finally:
        proc.terminate()
        proc.wait(60)
    diffs = sorted(h - p for h, p in zip(http_s, local_s))

    def q(values, p):
        return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]

    return {"runs": runs, "steps": steps, "size": size, "threads": threads,
            "http_p50_s": statistics.median(http_s), "local_p50_s": statistics.median(local_s),
            "diff_p50_s": statistics.median(diffs), "diff_p99_s": q(diffs, 99), "diff_min_s": diffs[0]}


def section(rows: list[tuple[str, dict]], machine: dict) -> str:
    out = [BEGIN, "## sdrt serve overhead over the in-process Pipeline (generated)", "",
           "Written by `benchmarks/serve_overhead.py`: the same txt2img (Euler a, seed 42, CFG 7.5) through "
           "`POST /sdapi/v1/txt2img` on a `sdrt serve` subprocess and through `Pipeline.txt2img`, alternating; "
           "the difference is HTTP minus in-process per pair. The images are checked equal.", "",
           f"CPU: {machine['model']}, {machine['cores']} usable cores, flags {' '.join(machine['flags']) or '-'}; "
           f"Python {platform.python_version()}.", "",
           "| artifact | size | steps | threads | runs | HTTP p50 | in-process p50 | difference p50 | difference p99 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        out.append(f"| {name} | {r['size']}² | {r['steps']} | {r['threads']} | {r['runs']} | "
                   f"{r['http_p50_s'] * 1e3:.1f} ms | {r['local_p50_s'] * 1e3:.1f} ms | "
                   f"{r['diff_p50_s'] * 1e3:.1f} ms | {r['diff_p99_s'] * 1e3:.1f} ms |")
    out += ["", END]
    return "\n".join(out)


def write_results(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--engines", type=Path, help="an existing ENGINE_DIR")
    which.add_argument("--tiny", action="store_true", help="build the tiny random-weight artifact (seconds)")
    which.add_argument("--sd15-shaped", action="store_true", help="build the SD1.5-shaped one (~4 GB, minutes)")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="default: 128 tiny, 256 sd15-shaped / artifact opt")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--results", type=Path, default=None, help="update this RESULTS.md's serve_overhead section")
    args = parser.parse_args()
    machine = cpu()
    print(f"CPU: {machine['model']} ({machine['cores']} cores) flags: {' '.join(machine['flags'])}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.engines:
            engines, name = args.engines, args.engines.name
        else:
            arch = "tiny" if args.tiny else "sd15"
            engines, name = build_artifact(arch, Path(tmp)), f"{arch} (random weights)"
        from sdrt.manifest import load_manifest

        size = args.size or (256 if args.sd15_shaped else load_manifest(engines).sizes.opt_size)
        result = measure(engines, args.runs, args.steps, size, args.threads, args.warmup)
    print(json.dumps({"artifact": name, "machine": machine, **result}, indent=2))
    if args.results:
        write_results(args.results, section([(name, result)], machine))
        print(f"updated {args.results}")


if __name__ == "__main__":
    main()
