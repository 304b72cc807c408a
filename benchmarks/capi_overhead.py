"""libsdrt's cost over the Python API: per-generation overhead (µs) and the first call (interpreter start).

    .venv/bin/python benchmarks/capi_overhead.py --engines engines/tiny --runs 200 [--results benchmarks/RESULTS.md]

Builds libsdrt (capi/build.py) into a temp folder, then measures, on the same ENGINE_DIR, 1 thread:
- overhead: in this process (libsdrt loaded with ctypes, so it uses this interpreter), ``sdrt_generate`` on a
  context whose Pipeline is swapped for a replay of one real result, against the same replay called from
  Python, alternating: the median of the paired differences is what the C path adds (struct checks, lock, the
  GIL round trip, argument conversion, the per-step callback and cancel check, pixels copied into malloc'd
  images and freed, ctypes' own ~1 µs call); end-to-end medians of real runs are given beside it (a loaded
  machine's noise there is milliseconds, far above the overhead);
- a plain C host (benchmarks/capi_bench.c, empty environment, its own interpreter): the first
  ``sdrt_context_open`` (starts Python, imports sdrt, opens the artifact), a second open (the artifact only),
  the first generate (opens the engines) and the per-generation times;
and writes its section of RESULTS.md (between its markers; the rest of the file is left as it is).
"""

from __future__ import annotations

import argparse
import ctypes as C
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- capi_overhead.py: begin -->", "<!-- capi_overhead.py: end -->"


class ContextParams(C.Structure):  # capi/sdrt.h sdrt_context_params
    _fields_ = [("struct_size", C.c_uint32), ("engine_dir", C.c_char_p), ("backend", C.c_char_p),
                ("threads", C.c_int), ("log", C.c_void_p), ("log_user_data", C.c_void_p), ("log_level", C.c_int)]


class Image(C.Structure):
    _fields_ = [("width", C.c_uint32), ("height", C.c_uint32), ("channels", C.c_uint32), ("data", C.c_void_p)]


class GenerateParams(C.Structure):  # capi/sdrt.h sdrt_generate_params
    _fields_ = [("struct_size", C.c_uint32), ("mode", C.c_char_p), ("prompt", C.c_char_p),
                ("negative_prompt", C.c_char_p), ("scheduler", C.c_char_p), ("width", C.c_int), ("height", C.c_int),
                ("steps", C.c_int), ("batch", C.c_int), ("guidance", C.c_float), ("strength", C.c_float),
                ("seed", C.c_int64), ("init_image", C.c_void_p), ("mask_image", C.c_void_p),
                ("progress", C.c_void_p), ("user_data", C.c_void_p)]


def build(out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "capi" / "build.py"), str(out)], check=True, capture_output=True)
    subprocess.run(["cc", "-std=c99", "-O2", f"-I{ROOT / 'capi'}", str(ROOT / "benchmarks" / "capi_bench.c"), "-o",
                    str(out / "capi_bench"), f"-L{out}", f"-Wl,-rpath,{out}", "-lsdrt"], check=True)
    return out


def in_process(lib_path: Path, engines: str, runs: int, steps: int, size: int) -> dict:
    import numpy as np

    from sdrt.pipeline import Pipeline

    lib = C.CDLL(str(lib_path))
    lib.sdrt_last_error.restype = C.c_char_p
    cp = ContextParams()
    lib.sdrt_context_params_init(C.byref(cp))
    cp.engine_dir, cp.threads = str(engines).encode(), 1
    ctx = C.c_void_p()
    assert lib.sdrt_context_open(C.byref(cp), C.byref(ctx)) == 0, lib.sdrt_last_error(None)
    gp = GenerateParams()
    lib.sdrt_generate_params_init(C.byref(gp))
    gp.prompt, gp.steps, gp.width, gp.height, gp.seed = b"a photo of a cat", steps, size, size, 0
    pipe = Pipeline(engines, threads=1)
    images, count = C.POINTER(Image)(), C.c_int()

    def c_call():
        status = lib.sdrt_generate(ctx, C.byref(gp), C.byref(images), C.byref(count), None)
        assert status == 0, lib.sdrt_last_error(ctx)
        lib.sdrt_images_free(images, count)

    def py_call():
        pipe.txt2img("a photo of a cat", steps=steps, width=size, height=size, seed=0)

    c_call(), py_call()  # engines open
    end_to_end = alternate(c_call, py_call, runs)

    # the overhead alone: the context's Pipeline swapped for a stub that replays one real result (and calls
    # the step callback `steps` times), against the same stub called from Python
    from sdrt import capi_impl

    result = pipe.txt2img("a photo of a cat", steps=steps, width=size, height=size, seed=0)

    class Replay:
        def txt2img(self, prompt, callback=None, **options):
            for i in range(steps):
                callback(i, steps, 0.0, None)
            return result

    (state,) = capi_impl._contexts.values()
    state.pipe = replay = Replay()
    stub = alternate(c_call, lambda: replay.txt2img("a photo of a cat", callback=lambda *a: None, steps=steps,
                                                    width=size, height=size, seed=0), runs * 20)
    lib.sdrt_context_close(ctx)
    diffs = sorted(c - p for c, p in zip(stub["c_us"], stub["python_us"]))
    target, copies = np.empty(result.images.shape, np.uint8), []
    for _ in range(runs * 20):  # the part of it that is the pixels' planar -> interleaved copy
        start = time.perf_counter()
        target[...] = result.images
        copies.append((time.perf_counter() - start) * 1e6)
    return {"end_to_end": end_to_end, "overhead_us_p50": statistics.median(diffs),
            "pixel_copy_us_p50": statistics.median(copies),
            "overhead_us_iqr": [diffs[len(diffs) // 4], diffs[3 * len(diffs) // 4]], "replay_runs": runs * 20}


def alternate(c_call, py_call, runs: int) -> dict:
    """Per-call µs of both, alternating which goes first."""
    c_us, py_us = [], []
    for i in range(runs):
        for fn, out in ((c_call, c_us), (py_call, py_us)) if i % 2 else ((py_call, py_us), (c_call, c_us)):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e6)
    return {"c_us": c_us, "python_us": py_us}


def cpu() -> tuple[str, str]:
    """CPU model and SIMD flags, from the one machine helper every benchmark uses (sdrt.machine)."""
    from sdrt.machine import cpu_info

    info = cpu_info()
    return info["model"], " ".join(info["flags"])


def render(rep: dict) -> str:
    c, p = rep["c_host"], rep["in_process"]
    med = statistics.median
    model, flags = rep["cpu"]
    return "\n".join([
        BEGIN, "## libsdrt (C ABI) overhead over the Python API (generated)", "",
        f"Generated by `benchmarks/capi_overhead.py` (do not edit by hand): ENGINE_DIR `{Path(rep['engines']).name}` "
        "(the tiny random-weight model, `sdrt make-model --arch tiny`), "
        f"{rep['size']}×{rep['size']}, {rep['steps']} step(s), 1 ONNX Runtime thread, {rep['runs']} runs each. "
        f"CPU: {model} ({rep['cores']} cores; {flags}). Python {rep['python']}.", "",
        "| measure | value |", "|---|---|",
        f"| C overhead per generation: `sdrt_generate` minus the Python call, both on a replayed result "
        f"({p['replay_runs']} paired runs; median, IQR) | {p['overhead_us_p50']:.0f} µs "
        f"({p['overhead_us_iqr'][0]:.0f} … {p['overhead_us_iqr'][1]:.0f}) |",
        f"| of which the pixels' copy from the Pipeline's planar view into interleaved RGB (median) | "
        f"{p['pixel_copy_us_p50']:.0f} µs |",
        f"| per generation, Python API / libsdrt via ctypes (in-process medians) | "
        f"{med(p['end_to_end']['python_us']) / 1e3:.2f} ms / {med(p['end_to_end']['c_us']) / 1e3:.2f} ms |",
        f"| per generation, plain C host (median) | {med(c['generate_us']) / 1e3:.2f} ms |",
        f"| first call: first `sdrt_context_open` (interpreter start, imports, artifact) | "
        f"{c['first_open_us'] / 1e3:.0f} ms |",
        f"| second `sdrt_context_open` (artifact only); interpreter start and imports ≈ the difference | "
        f"{c['second_open_us'] / 1e3:.0f} ms; {(c['first_open_us'] - c['second_open_us']) / 1e3:.0f} ms |",
        f"| first `sdrt_generate` (opens the engines) | {c['first_generate_us'] / 1e3:.0f} ms |", "", END])


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default=str(ROOT / "engines" / "tiny"), help="a tiny ENGINE_DIR (make demo)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--results", default=None, help="update this RESULTS.md's libsdrt section")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdrt-capi-") as tmp:
        out = build(Path(tmp))
        proc = subprocess.run([str(out / "capi_bench"), args.engines, str(args.runs), str(args.steps),
                               str(args.size)], env={}, capture_output=True, text=True, check=True)
        rep = {"c_host": json.loads(proc.stdout),
               "in_process": in_process(out / "libsdrt.so", args.engines, args.runs, args.steps, args.size)}
    import os

    rep.update(engines=args.engines, runs=args.runs, steps=args.steps, size=args.size, cpu=cpu(),
               cores=len(os.sched_getaffinity(0)), python=platform.python_version())
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    section = render(rep)
    print(section)
    if args.results:
        write_section(Path(args.results), section)


if __name__ == "__main__":
    main()
