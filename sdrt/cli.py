"""The one ``sdrt`` command. Build-side subcommands (make-model, export, build-engines, verify) import the
``sdrt_export`` package lazily, so the runtime commands (txt2img, img2img, inpaint, bench, info) work without
torch installed."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sdrt import cli_args, cli_parsers
from sdrt.cli_help import Parser, VersionAction, add_verbose, examples
from sdrt.errors import SdrtError
from sdrt.progress import setup_logging

log = logging.getLogger("sdrt")
DESCRIPTION = ("sdrt: an optimized, torch-free Stable Diffusion runtime. Export a diffusers model once (needs torch), "
               "then generate from the ENGINE_DIR with ONNX Runtime or TensorRT alone.")


def _export_module(name: str):
    import importlib

    try:
        return importlib.import_module(f"sdrt_export.{name}")
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in ("torch", "diffusers", "transformers", "onnx", "polygraphy"):
            raise SdrtError(
                f"this command needs the build-side packages ({exc.name} is missing): "
                "pip install torch==2.13.0 && pip install 'sdrt[export]'"
            ) from None
        raise


def _sizes(args):
    from sdrt.specs import SizeRange

    return SizeRange(min_size=args.min_size, opt_size=args.opt_size or min(max(512, args.min_size), args.max_size),
                     max_size=args.max_size, max_batch=args.max_batch)


def cmd_make_model(args) -> dict:
    out = _export_module("make_model").make_model(args.out_dir, arch=args.arch, seed=args.seed, force=args.force)
    return {"model": str(out), "arch": args.arch, "seed": args.seed,
            "message": f"wrote a random-weight {args.arch} model (seed {args.seed}) to {out}"}


def cmd_export(args) -> dict:
    return _export_module("exporter").export_model(
        args.model, args.out, sizes=_sizes(args), opset=args.opset, force=args.force, progress=not args.json,
        **({"prior": args.prior} if getattr(args, "prior", None) else {}),  # Kandinsky 2.2: the prior folder
        precision=args.precision, tiny_vae_dir=args.tiny_vae, controlnet_dirs=args.controlnet or (),
        loras=args.lora, resume=args.resume,
    )


def cmd_build_engines(args) -> dict:
    from sdrt.specs import SizeRange

    sizes = None  # the artifact's own sizes (SizeRange's defaults for a new export)
    if any(getattr(args, k) is not None for k in ("min_size", "opt_size", "max_size", "max_batch")):
        for key in ("min_size", "max_size", "max_batch"):
            if getattr(args, key) is None:
                setattr(args, key, getattr(SizeRange, key))
        sizes = _sizes(args)
    return _export_module("build_engines").build_engines(
        args.model, args.out, args.backend, sizes=sizes, static=args.static, builder_level=args.builder_level,
        **({"prior": args.prior} if getattr(args, "prior", None) else {}),  # Kandinsky 2.2: the prior folder
        workspace_gb=args.workspace, precision=args.precision, gpu_targets=args.gpu_targets, force=args.force,
        progress=not args.json, refit=args.refit,
    )


def cmd_verify(args) -> dict:
    kandinsky = _export_module("verify_kandinsky")
    if kandinsky.is_kandinsky_artifact(args.engines):  # two stages: prior, decoder, MoVQ checked apart
        return kandinsky.verify(args.model, args.engines, scheduler=args.scheduler, steps=args.steps,
                                width=args.width, height=args.height, seed=args.seed, prompt=args.prompt,
                                prior_dir=args.prior)
    report = _export_module("verify").verify(
        args.model, args.engines, scheduler=args.scheduler, steps=args.steps, width=args.width,
        height=args.height, seed=args.seed, prompt=args.prompt,
        **({"controlnet_dirs": args.controlnet, "control_images": args.control_image} if args.controlnet else {}),
        loras=args.lora,
        backend=args.backend,
    )
    return report


def cmd_generate(args) -> dict:
    from sdrt import generate_cli

    return generate_cli.run(args)


def cmd_bench(args) -> dict:
    from sdrt import bench

    return bench.cmd_bench(args)


def cmd_serve(args) -> dict:
    from sdrt.serve import cli as serve_cli  # fastapi / uvicorn load only here

    return serve_cli.run(args)


def cmd_info(args) -> dict:
    from sdrt import info

    return info.describe(args.engine_dir, verify=args.verify)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdrt", description=DESCRIPTION, epilog=examples(
        "sdrt make-model /tmp/model --arch tiny        # random weights; or use a real diffusers folder",
        "sdrt export --model /tmp/model --out /tmp/engines",
        'sdrt txt2img --engines /tmp/engines --prompt "a photo of a cat" --out cat.png',
        "sdrt info /tmp/engines",
        note="`sdrt COMMAND --help` describes each command. Bad input prints one line and exits 2."))
    parser.add_argument("--version", action=VersionAction,
                        help="print sdrt's version and the onnxruntime / tensorrt / tensorrt_rtx / cupy / openvino found; exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = sub.add_parser("make-model", help="write a random-weight diffusers pipeline folder",
                       description="Write a diffusers pipeline folder with random weights (tests, demos, "
                                   "benchmarks: its images are noise).",
                       epilog=examples("sdrt make-model /tmp/model --arch tiny --seed 0",
                                       "sdrt make-model /tmp/sdxl --arch sdxl   # real SDXL shapes: large, slow"))
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    p.add_argument("--arch", default="tiny",
                   help="tiny (fast tests), tiny-inpaint, tiny-sd2, tiny-sd2-base, tiny-sd-turbo, tiny-lcm, tiny-sdxl, "
                        "tiny-sdxl-turbo, tiny-sdxl-inpaint; sd15, sd2, sdxl (real shapes, random weights); taesd, "
                        "taesdxl (a tiny VAE, AutoencoderTiny, for `sdrt export --tiny-vae`); tiny-kandinsky22, "
                        "tiny-kandinsky22-inpaint, kandinsky22 (Kandinsky 2.2: OUT_DIR/prior and OUT_DIR/decoder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("export", help="export a diffusers model folder to ONNX (ENGINE_DIR)",
                       description="Export a diffusers Stable Diffusion folder (SD1.x, SD2.x, SD-Turbo, LCM, SDXL) "
                                   "to ONNX with dynamic batch and size; each component is checked against torch.",
                       epilog=examples("sdrt export --model ./stable-diffusion-v1-5 --out engines/sd15",
                                       "sdrt export --model ./sdxl --out engines/sdxl16 --precision fp16 "
                                       "--min-size 512 --max-size 1024 --max-batch 2"))
    g = p.add_argument_group("input and output")
    g.add_argument("--model", metavar="MODEL_DIR", required=True, help="diffusers Stable Diffusion folder")
    g.add_argument("--prior", metavar="PRIOR_DIR", default=None,
                   help="Kandinsky 2.2: the KandinskyV22PriorPipeline folder of the decoder given as --model "
                        "(not needed for a folder holding prior/ and decoder/, as make-model writes)")
    g.add_argument("--out", metavar="ENGINE_DIR", required=True, help="folder to create")
    g.add_argument("--force", action="store_true", help="replace an existing ENGINE_DIR")
    g.add_argument("--resume", action="store_true",
                   help="keep the components already checked when the export fails or is interrupted (in "
                        ".ENGINE_DIR.partial beside it), and reuse them when run again with the same inputs")
    g.add_argument("--json", action="store_true", help="print a JSON summary (and no progress bar)")
    cli_args.add_size_range(p.add_argument_group("size range (what the artifact serves)"))
    g = p.add_argument_group("export")
    g.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 17)")
    g.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: mixed precision with fp32 islands (see export/fp16.py); I/O stays float32")
    g.add_argument("--tiny-vae", metavar="TAESD_DIR", default=None,
                   help="also export this AutoencoderTiny (TAESD) folder's decoder and encoder, for --vae tiny")
    g.add_argument("--controlnet", metavar="CONTROLNET_DIR", action="append", default=None,
                   help="also export this diffusers ControlNetModel folder (repeatable: one --control-image each)")
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", default=None,
                   help="merge this LoRA (kohya/A1111 or diffusers/peft .safetensors; weight default 1) into the "
                        "UNet / text encoders before export; repeatable; recorded in the manifest")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engines", help="build TensorRT engines (or ORT-optimized graphs) into an ENGINE_DIR",
                       description="Build TensorRT / TensorRT-RTX engines, or graphs optimized for ONNX Runtime, "
                                   "one component at a time into ENGINE_DIR/BACKEND/ (exporting first when needed). "
                                   "A second run rebuilds only what changed.",
                       epilog=examples("sdrt build-engines --model ./sd15 --out engines/sd15 --backend ort-cpu",
                                       "sdrt build-engines --model ./sd15 --out engines/sd15 --backend tensorrt-rtx "
                                       "--gpu-targets sm86,sm89",
                                       "sdrt build-engines --model ./sd15 --out engines/sd15 --backend tensorrt "
                                       "--static 512x512"))
    g = p.add_argument_group("input and output")
    g.add_argument("--model", metavar="MODEL_DIR", required=True,
                   help="diffusers Stable Diffusion folder (exported first if needed)")
    g.add_argument("--prior", metavar="PRIOR_DIR", default=None,
                   help="Kandinsky 2.2: the prior folder of the decoder given as --model (as for `sdrt export`)")
    g.add_argument("--out", metavar="ENGINE_DIR", required=True, help="created or updated")
    g.add_argument("--backend", required=True, choices=("tensorrt", "tensorrt-rtx", "ort-cpu", "ort-cuda"),
                   help="what to build for")
    g.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="precision of the ONNX export (when it exports)")
    g.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    g.add_argument("--json", action="store_true", help="print a JSON summary (and no progress bar)")
    g = p.add_argument_group("size range (default: the existing artifact's)")
    for flag, what, new in (("--min-size", "smallest image side", 256), ("--opt-size", "side TensorRT tunes for", 512),
                            ("--max-size", "largest image side", 1024), ("--max-batch", "most images per prompt", 4)):
        g.add_argument(flag, type=int, default=None,
                       help=f"{what}; default: the existing artifact's, {new} for a new one")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--static", metavar="WxH", default=None, help="fix width and height (min=opt=max; batch stays)")
    g.add_argument("--builder-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    g.add_argument("--workspace", type=float, default=None, help="TensorRT workspace limit in GB")
    g.add_argument("--gpu-targets", default=None, help="TensorRT-RTX compute capabilities, e.g. sm86,sm89")
    g.add_argument("--refit", action="store_true",
                   help="refittable engines: run-time LoRA refits the weight-map weights instead of rebuilding")
    p.set_defaults(func=cmd_build_engines)

    for mode in ("txt2img", "img2img", "inpaint"):
        p = sub.add_parser(mode, help=f"{mode} from an ENGINE_DIR (no torch needed)",
                           description=f"{mode} from an ENGINE_DIR alone (numpy + ONNX Runtime or TensorRT, no torch); "
                                       "the PNG carries the parameters in A1111's format.",
                           epilog=examples(*cli_args.GENERATE_EXAMPLES[mode]))
        g = p.add_argument_group("input and output")
        g.add_argument("--engines", metavar="ENGINE_DIR", required=True, help="written by `sdrt export`")
        if mode != "txt2img":
            g.add_argument("--image", required=True, help="input image (any format Pillow reads)")
        if mode == "inpaint":
            g.add_argument("--mask", required=True, help="white = repaint, black = keep")
        g.add_argument("--out", metavar="PNG", required=True, help="output file (batch > 1 adds -1, -2, ...)")
        g.add_argument("--json", action="store_true", help="print per-stage timings as JSON (and no progress bar)")
        cli_args.add_request(p.add_argument_group("request"), mode)
        g = p.add_argument_group("runtime")
        cli_args.add_backend(g)
        g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
        g.add_argument("--vae", choices=("full", "tiny"), default="full",
                       help="tiny: the TAESD that `sdrt export --tiny-vae` added (fast previews, few-step models)")
        g.add_argument("--rng", default="cpu", metavar="cpu|cuda[:GPU]",
                       help="whose generator --seed reproduces: torch's CPU generator, or torch.Generator('cuda') "
                            "on GPU (h100, a100, 4090, t4, ... or sm=N; default h100) — computed here, no GPU needed")
        g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", default=None,
                       help="apply this LoRA at run time (no re-export; ort backends); repeatable")
        g.add_argument("--lora-dir", metavar="DIR", default=None,
                       help="where A1111 prompt tags <lora:NAME:WEIGHT> find NAME.safetensors (tags are removed "
                            "from the prompt before tokenizing)")
        cli_args.add_control(p.add_argument_group("ControlNet (artifacts exported with --controlnet)"))
        p.set_defaults(func=cmd_generate, mode=mode)

    cli_parsers.add_verify(sub, cmd_verify)
    cli_parsers.add_bench(sub, cmd_bench)
    cli_parsers.add_info(sub, cmd_info)

    from sdrt.serve.cli import add_arguments as add_serve_arguments  # standard library only

    p = sub.add_parser("serve", help="HTTP server: A1111 /sdapi/v1, OpenAI images, async jobs, web page, metrics",
                       description="Loads the engines once and serves them over HTTP (needs sdrt[serve]).",
                       epilog=examples("sdrt serve --engines engines/tiny",
                                       "sdrt serve --engines engines/tiny --host 0.0.0.0 --api-auth me:secret"))
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    add_verbose(parser, sub)
    return parser


def check_threads(threads, flag: str = "--threads", cap: bool = True):
    """``threads`` None, or an integer in 1..this machine's logical CPUs (``cap``; more only oversubscribes, and
    --threads 100000 hung in ONNX Runtime's thread pool); InputError otherwise."""
    import os

    from sdrt.errors import InputError

    cpus = os.cpu_count() or 1
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
                                or (cap and threads > cpus)):
        raise InputError(f"{flag} must be an integer in 1..{cpus} (this machine's logical CPUs), got {threads!r}"
                         if cap else f"{flag} must be an integer >= 1, got {threads!r}")
    return threads


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        try:
            # a Ray cluster's replicas may have more CPUs than this machine: only >= 1 there
            check_threads(getattr(args, "threads", None), cap=not getattr(args, "ray_address", None))
            result = args.func(args)
        except SdrtError as exc:
            print(f"sdrt {args.command}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print(f"sdrt {args.command}: interrupted", file=sys.stderr)
            return 130
        if getattr(args, "json", False):
            print(json.dumps(result, indent=2, default=str))
        elif isinstance(result, dict) and result.get("message"):
            print(result["message"])
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:  # `sdrt ... --json | head`: the reader left; exit as SIGPIPE would, no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 1 if isinstance(result, dict) and result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
