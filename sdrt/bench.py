"""``sdrt bench``: per-stage latency, cold start and peak RSS of sdrt, optionally beside its CPU peers.

Each system runs in its own worker process (``sdrt.bench_worker``: ``python -m sdrt.bench`` for sdrt and
for the OpenVINO peer — the same pipeline on ``--backend openvino`` —, ``python -m sdrt_export.bench_diffusers``
for diffusers, ``python -m sdrt_export.bench_peers`` for stable-diffusion.cpp) that loads once and serves
runs over a pipe, so peak RSS is per system and runs alternate A B C A B C with the same thread count
(``--one-resident``: a fresh process per system and round instead, closed before the next one starts, for
models two systems cannot hold at once; the loops are in ``sdrt.bench_runs``).
``--compare diffusers,openvino,sdcpp`` names the peers; one not installed (or that cannot run this model) is
skipped with the reason in the report. The UNet's FLOPs are counted once from the artifact's ONNX
(``sdrt_export.flops``), so every system's UNet figure also reads as GFLOP/s and a share of this CPU's fp32
peak (``sdrt.machine``). Statistics, the table and the plot live in ``sdrt.bench_report``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from sdrt import bench_report
from sdrt.bench_worker import serve
from sdrt.errors import InputError, SdrtError
from sdrt.manifest import load_manifest

log = logging.getLogger(__name__)

SWEEP_SIZES = (256, 384, 512)
SWEEP_BATCHES = (1, 2, 4)
PEERS = ("diffusers", "openvino", "sdcpp")
# the worker module of each system; openvino is sdrt's own worker on the openvino backend
MODULES = {"sdrt": "sdrt.bench", "diffusers": "sdrt_export.bench_diffusers", "openvino": "sdrt.bench",
           "sdcpp": "sdrt_export.bench_peers"}


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
    compare_diffusers: str | None = None  # the older flag: --compare diffusers --model DIR
    compare: tuple = ()  # peers from PEERS
    model: str | None = None  # the diffusers folder of the diffusers and sdcpp peers (default: the export's source)
    sweep: bool = False
    one_resident: bool = False  # a fresh process per system and round, one system in memory at a time
    backend: str = "ort-cpu"
    points: list = field(default_factory=list)


def bench_image(width: int, height: int):
    """A deterministic RGB gradient, the img2img input of both systems."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


class SdrtSystem:
    """The worker side for sdrt: a Pipeline with every engine the mode needs opened at load."""

    name = "sdrt"

    def info(self) -> dict:
        import onnxruntime

        from sdrt.backends.ort import CACHE_ENV

        return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                "sdrt_ort_cache": "on" if os.environ.get(CACHE_ENV) else "off"}

    def load(self, request: dict) -> dict:
        from sdrt.pipeline import Pipeline
        from sdrt.specs import UNET, VAE_ENCODER

        self.pipe = Pipeline(request["engines"], backend=request.get("backend", "ort-cpu"), threads=request["threads"])
        for name in self.pipe.manifest.specs.components:  # every text encoder too (SDXL has two)
            if name != VAE_ENCODER or request["mode"] == "img2img":
                self.pipe.engine(name)
        precision = getattr(self.pipe.engine(UNET), "precision", None) or self.pipe.manifest.data.get("precision")
        return {"precision": precision, "backend": request.get("backend", "ort-cpu")}

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
        if "prior" in t:  # Kandinsky 2.2: its prior's calls (JSON; the table lists the shared stages)
            out["prior_call"] = t["prior"]
        if "vae_encode" in t:
            out["vae_encode"] = sum(t["vae_encode"]) if isinstance(t["vae_encode"], list) else t["vae_encode"]
        return out


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
    if cfg.model and not os.path.isfile(os.path.join(cfg.model, "model_index.json")):
        raise InputError(f"--model {cfg.model} is not a diffusers folder (no model_index.json)")
    unknown = [name for name in cfg.compare if name not in PEERS]
    if unknown:
        raise InputError(f"--compare: unknown system {unknown[0]!r}; known: {', '.join(PEERS)}")
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


def _missing(*modules: str) -> str | None:
    return next((m for m in modules if importlib.util.find_spec(m) is None), None)


def peer_systems(cfg: BenchConfig, manifest) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """[(name, source)] of the systems that run, sdrt first, and {name: reason} of the peers skipped."""
    model = cfg.compare_diffusers or cfg.model or manifest.data.get("source", {}).get("path")
    if model and not os.path.isfile(os.path.join(model, "model_index.json")):
        model = None  # the recorded source moved; the peers that need it are skipped
    wanted = list(dict.fromkeys([*cfg.compare, *(["diffusers"] if cfg.compare_diffusers else [])]))
    run, skipped = [("sdrt", cfg.engines)], {}
    for name in wanted:
        if name == "diffusers":
            missing = _missing("torch", "diffusers", "sdrt_export")
            if cfg.compare_diffusers and missing:  # asked for by name: an error, as before
                raise SdrtError(f"--compare-diffusers needs the build-side packages ({missing} is missing): "
                                "pip install torch==2.13.0 && pip install 'sdrt[export]'")
            reason = (f"not installed ({missing}): pip install torch==2.13.0 'sdrt[export]'" if missing else
                      None if model else "no diffusers folder: pass --model DIR")
        elif name == "openvino":
            reason = ("not installed (openvino): pip install 'sdrt[bench]'" if _missing("openvino") else
                      "sdrt itself runs on --backend openvino here" if cfg.backend == "openvino" else None)
        else:
            missing = _missing("stable_diffusion_cpp", "safetensors", "sdrt_export")
            reason = f"not installed ({missing}): pip install 'sdrt[bench]' (builds from source)" if missing else \
                "no diffusers folder: pass --model DIR" if not model else \
                "measures txt2img at batch 1 only" if cfg.mode != "txt2img" or cfg.batch != 1 or cfg.sweep else None
            if reason is None:
                from sdrt_export.bench_peers import support

                reason = support(model)
        if reason:
            log.info("--compare %s skipped: %s", name, reason)
            skipped[name] = reason
        else:
            run.append((name, cfg.engines if name == "openvino" else model))
    return run, skipped


def unet_work(cfg: BenchConfig, manifest, point: tuple[int, int, int]) -> dict:
    """FLOPs of one UNet call at this point (CFG doubles the batch), counted once from the artifact's ONNX."""
    from sdrt.specs import UNET

    if _missing("onnx", "sdrt_export"):
        return {"error": "FLOPs not counted: needs onnx and sdrt_export (pip install 'sdrt[export]')"}
    from sdrt_export.flops import graph_flops

    width, height, batch = point
    unet_batch = batch * (2 if cfg.guidance > 1 else 1)
    try:
        counted = graph_flops(manifest.verified_path(UNET), manifest.specs[UNET].shapes(unet_batch, height, width))
    except (ValueError, OSError) as exc:
        return {"error": f"FLOPs not counted: {exc}"}
    return {"flops": counted["total"], "by_op": counted["by_op"], "unet_batch": unet_batch,
            "graph": f"{UNET} ONNX as exported (sha256 {counted['graph_sha256'][:12]})"}


def _request(cfg: BenchConfig, point: tuple[int, int, int]) -> dict:
    width, height, batch = point
    return {"prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "steps": cfg.steps,
            "guidance": cfg.guidance, "seed": cfg.seed, "width": width, "height": height, "batch": batch,
            "scheduler": cfg.scheduler, "mode": cfg.mode, "strength": cfg.strength}


def _compare_list(text: str | None) -> tuple:
    """'diffusers,openvino,sdcpp' -> ('diffusers', 'openvino', 'sdcpp'); 'all' -> every peer."""
    if not text:
        return ()
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    return PEERS if names == ["all"] else tuple(dict.fromkeys(names))


def cmd_bench(args) -> dict:
    """The CLI entry: run, write --json / --plot, return the report with the table as its message."""
    cfg = BenchConfig(engines=args.engines, width=args.width, height=args.height, steps=args.steps, batch=args.batch,
                      scheduler=args.scheduler, guidance=args.guidance, runs=args.runs, warmup=args.warmup,
                      threads=args.threads, mode=args.mode, strength=args.strength, seed=args.seed,
                      compare_diffusers=args.compare_diffusers, sweep=args.sweep, backend=args.backend,
                      compare=_compare_list(getattr(args, "compare", None)), model=getattr(args, "model", None),
                      one_resident=getattr(args, "one_resident", False))
    if args.plot and not args.plot.lower().endswith(".png"):
        raise InputError(f"--plot must name a .png file, got {args.plot}")
    from sdrt.bench_runs import run_bench

    report = run_bench(cfg)
    if args.json_out:  # temp file then rename: never half a JSON
        try:
            partial = f"{args.json_out}.partial"
            with open(partial, "w") as handle:
                json.dump(report, handle, indent=2)
            os.replace(partial, args.json_out)
        except OSError as exc:
            raise InputError(f"cannot write --json {args.json_out}: {exc.strerror}") from None
    if args.plot:
        bench_report.plot(report, args.plot)
    report["message"] = bench_report.table(report)
    return report


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    serve(SdrtSystem())
