"""``sdrt bench``: per-stage latency, cold start and peak RSS of sdrt, optionally side by side with diffusers.

Each system runs in its own worker process (``python -m sdrt.bench`` for sdrt,
``python -m sdrt_export.bench_diffusers`` for diffusers) that loads once and serves runs over a pipe,
so peak RSS is per system and runs alternate A B A B. The worker's first load and run are its cold
start. Statistics, the table and the plot live in ``sdrt.bench_report``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from sdrt import bench_report
from sdrt.errors import InputError, SdrtError
from sdrt.manifest import load_manifest
from sdrt.progress import progress_bar

log = logging.getLogger(__name__)

SWEEP_SIZES = (256, 384, 512)
SWEEP_BATCHES = (1, 2, 4)


@dataclass
class BenchConfig:
    engines: str
    width: int | None = None
    height: int | None = None
    steps: int = 20
    batch: int = 1
    scheduler: str | None = None
    guidance: float = 7.5
    runs: int = 5
    warmup: int = 1
    threads: int | None = None
    mode: str = "txt2img"
    strength: float = 0.75
    seed: int = 0
    prompt: str = "a photo of an astronaut riding a horse on mars"
    negative_prompt: str = "blurry, low quality"
    compare_diffusers: str | None = None
    sweep: bool = False
    backend: str = "ort-cpu"
    points: list = field(default_factory=list)


def bench_image(width: int, height: int):
    """A deterministic RGB gradient, the img2img input of both systems."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SdrtSystem:
    """The worker side for sdrt: a Pipeline with every engine the mode needs opened at load."""

    name = "sdrt"

    def info(self) -> dict:
        import onnxruntime

        from sdrt.backends.ort import CACHE_ENV

        return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                "sdrt_ort_cache": "on" if os.environ.get(CACHE_ENV) else "off"}

    def load(self, request: dict) -> None:
        from sdrt.pipeline import Pipeline
        from sdrt.specs import VAE_ENCODER

        self.pipe = Pipeline(request["engines"], backend=request.get("backend", "ort-cpu"), threads=request["threads"])
        for name in self.pipe.manifest.specs.components:  # every text encoder too (SDXL has two)
            if name != VAE_ENCODER or request["mode"] == "img2img":
                self.pipe.engine(name)

    def run(self, r: dict) -> dict:
        options = dict(negative_prompt=r["negative_prompt"], steps=r["steps"], guidance=r["guidance"], seed=r["seed"],
                       width=r["width"], height=r["height"], scheduler=r["scheduler"], batch=r["batch"])
        start = time.perf_counter()
        if r["mode"] == "img2img":
            image = bench_image(r["width"], r["height"])
            start = time.perf_counter()
            result = self.pipe.img2img(image, r["prompt"], strength=r["strength"], **options)
        else:
            result = self.pipe.txt2img(r["prompt"], **options)
        end_to_end = time.perf_counter() - start
        t = result.timings
        unet = t["unet"] if isinstance(t["unet"], list) else [t["unet"]]
        out = {"tokenize": t["tokenize"], "text_encoder": t["text_encoder"], "unet_call": unet,
               "loop_overhead_step": t["loop_overhead"] / len(unet), "vae_decode": t["vae_decode"],
               "end_to_end": end_to_end}
        if "vae_encode" in t:
            out["vae_encode"] = sum(t["vae_encode"]) if isinstance(t["vae_encode"], list) else t["vae_encode"]
        return out


def serve(system) -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per line on the original stdout."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the reply stream
    replies = os.fdopen(reply_fd, "w", buffering=1)
    replies.write(json.dumps({"ready": True, "info": system.info()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            start = time.perf_counter()
            if request["cmd"] == "load":
                system.load(request)
                reply = {"seconds": time.perf_counter() - start}
            elif request["cmd"] == "run":
                reply = {"timings": system.run(request)}
            else:
                break
        except Exception as exc:  # reported to the parent, which raises it as an SdrtError
            reply = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        reply["peak_rss_bytes"] = peak_rss_bytes()
        replies.write(json.dumps(reply) + "\n")


class Worker:
    """The parent's handle on one worker process; timing starts at launch (the cold start)."""

    def __init__(self, name: str, module: str, threads: int):
        self.name, self.stderr, self.peak_rss = name, tempfile.TemporaryFile(mode="w+"), 0
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        hello = self._read()
        self.process_start = time.perf_counter() - self.launched
        self.info = hello.get("info", {})

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
            raise SdrtError(f"{self.name} worker exited ({self.proc.returncode}): {lines[-1] if lines else 'no output'}")
        reply = json.loads(line)
        if "error" in reply:
            raise SdrtError(f"{self.name} worker: {reply['error']}")
        self.peak_rss = max(self.peak_rss, reply.get("peak_rss_bytes", 0))
        return reply

    def ask(self, cmd: str, **request) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **request}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def plan(cfg: BenchConfig) -> list[tuple[int, int, int]]:
    """Validate the request against the artifact; (width, height, batch) of each measured point."""
    for name, low in (("runs", 1), ("warmup", 0), ("steps", 1), ("batch", 1)):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < low:
            raise InputError(f"--{name} must be an integer >= {low}, got {value!r}")
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.mode not in ("txt2img", "img2img"):
        raise InputError(f"--mode must be txt2img or img2img, got {cfg.mode!r}")
    manifest = load_manifest(cfg.engines)
    sizes, scale = manifest.sizes, manifest.dims.vae_scale_factor
    if cfg.mode == "img2img" and not manifest.has("vae_encoder"):
        raise InputError(f"{cfg.engines} has no vae_encoder; img2img cannot be benchmarked")
    if cfg.compare_diffusers and not os.path.isfile(os.path.join(cfg.compare_diffusers, "model_index.json")):
        raise InputError(f"--compare-diffusers {cfg.compare_diffusers} is not a diffusers folder (no model_index.json)")
    if cfg.sweep:
        points = [(s, s, b) for s in SWEEP_SIZES for b in SWEEP_BATCHES
                  if sizes.min_size <= s <= sizes.max_size and b <= sizes.max_batch]
        if not points:
            raise InputError(f"no sweep point fits this artifact ({sizes.min_size}..{sizes.max_size}, "
                             f"batch <= {sizes.max_batch})")
        return points
    width = cfg.width or sizes.opt_size
    height = cfg.height or sizes.opt_size
    sizes.check(width, height, cfg.batch, scale)
    return [(width, height, cfg.batch)]


def _check_diffusers_installed() -> None:
    import importlib.util

    for name in ("torch", "diffusers", "sdrt_export"):
        if importlib.util.find_spec(name) is None:
            raise SdrtError(f"--compare-diffusers needs the build-side packages ({name} is missing): "
                            "pip install torch==2.13.0 && pip install 'sdrt[export]'")


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every system (cold start, warmup, alternating timed runs); return the full report."""
    points = plan(cfg)
    threads = cfg.threads or len(os.sched_getaffinity(0))
    systems = [("sdrt", "sdrt.bench", cfg.engines)]
    if cfg.compare_diffusers:
        _check_diffusers_installed()
        systems.append(("diffusers", "sdrt_export.bench_diffusers", cfg.compare_diffusers))
    workers: dict[str, Worker] = {}
    cold: dict[str, dict] = {}
    runs = len(systems) * (1 + len(points) * (cfg.warmup + cfg.runs))  # cold starts, warmups, timed runs
    with progress_bar(total=runs, desc="bench", unit="run") as bar:
        try:
            first = _request(cfg, points[0])
            for name, module, source in systems:
                log.info("%s: cold start (fresh process, load, first %dx%d run)", name, *points[0][:2])
                bar.set_postfix_str(f"{name}: cold start")
                worker = workers[name] = Worker(name, module, threads)
                load = worker.ask("load", engines=source, model=source, threads=threads, mode=cfg.mode,
                                  backend=cfg.backend)
                loaded = time.perf_counter()
                first_run = worker.ask("run", **first)
                cold[name] = {"process_start_s": worker.process_start, "load_s": load["seconds"],
                              "first_run_s": time.perf_counter() - loaded,
                              "total_s": time.perf_counter() - worker.launched,
                              "first_run_stages": first_run["timings"]}
                bar.update(1)
            results = []
            for point in points:
                samples = {name: [] for name in workers}
                request = _request(cfg, point)
                for i in range(cfg.warmup + cfg.runs):
                    for name, worker in workers.items():
                        phase = f"warmup {i + 1}/{cfg.warmup}" if i < cfg.warmup else \
                            f"run {i + 1 - cfg.warmup}/{cfg.runs}"
                        bar.set_postfix_str(f"{name} {point[0]}x{point[1]} batch {point[2]}: {phase}")
                        log.info("%s %dx%d batch %d: %s", name, *point, phase)
                        timings = worker.ask("run", **request)["timings"]
                        bar.update(1)
                        if i >= cfg.warmup:
                            samples[name].append(timings)
                results.append(bench_report.point_summary(point, samples))
            infos = {name: w.info for name, w in workers.items()}
            rss = {name: w.peak_rss for name, w in workers.items()}
        finally:
            for worker in workers.values():
                worker.close()
    return bench_report.report(asdict(cfg) | {"points": [list(p) for p in points]}, threads, cold, rss, infos, results)


def _request(cfg: BenchConfig, point: tuple[int, int, int]) -> dict:
    width, height, batch = point
    return {"prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "steps": cfg.steps,
            "guidance": cfg.guidance, "seed": cfg.seed, "width": width, "height": height, "batch": batch,
            "scheduler": cfg.scheduler, "mode": cfg.mode, "strength": cfg.strength}


def cmd_bench(args) -> dict:
    """The CLI entry: run, write --json / --plot, return the report with the table as its message."""
    cfg = BenchConfig(engines=args.engines, width=args.width, height=args.height, steps=args.steps, batch=args.batch,
                      scheduler=args.scheduler, guidance=args.guidance, runs=args.runs, warmup=args.warmup,
                      threads=args.threads, mode=args.mode, strength=args.strength, seed=args.seed,
                      compare_diffusers=args.compare_diffusers, sweep=args.sweep, backend=args.backend)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise InputError(f"--plot must name a .png file, got {args.plot}")
    report = run_bench(cfg)
    if args.json_out:
        try:
            with open(args.json_out, "w") as handle:
                json.dump(report, handle, indent=2)
        except OSError as exc:
            raise InputError(f"cannot write --json {args.json_out}: {exc.strerror}") from None
    if args.plot:
        bench_report.plot(report, args.plot)
    report["message"] = bench_report.table(report)
    return report


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    serve(SdrtSystem())
