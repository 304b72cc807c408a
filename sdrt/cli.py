"""The one ``sdrt`` command. Build-side subcommands (make-model, export, verify) import the
``sdrt_export`` package lazily, so the runtime commands work without torch installed."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sdrt.errors import SdrtError

log = logging.getLogger("sdrt")


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
    return {"model": str(out), "arch": args.arch, "seed": args.seed}


def cmd_export(args) -> dict:
    return _export_module("exporter").export_model(
        args.model, args.out, sizes=_sizes(args), opset=args.opset, force=args.force, progress=not args.json,
        precision=args.precision,
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
        workspace_gb=args.workspace, precision=args.precision, gpu_targets=args.gpu_targets, force=args.force,
        progress=not args.json,
    )


def cmd_verify(args) -> dict:
    report = _export_module("verify").verify(
        args.model, args.engines, scheduler=args.scheduler, steps=args.steps, width=args.width,
        height=args.height, seed=args.seed, prompt=args.prompt,
    )
    return report


def cmd_generate(args) -> dict:
    from sdrt import generate_cli

    return generate_cli.run(args)


def cmd_bench(args) -> dict:
    from sdrt import bench

    return bench.cmd_bench(args)


def _add_size_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-size", type=int, default=256, help="smallest image side served (pixels)")
    p.add_argument("--opt-size", type=int, default=None, help="side TensorRT tunes for (default 512)")
    p.add_argument("--max-size", type=int, default=1024, help="largest image side served (pixels)")
    p.add_argument("--max-batch", type=int, default=4, help="most images per prompt")


def _add_backend(p: argparse.ArgumentParser) -> None:
    from sdrt.backends import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu",
                   help="what runs the components: the exported ONNX (or the graphs `sdrt build-engines` optimized "
                        "for this backend) on ONNX Runtime, or TensorRT engines built by `sdrt build-engines`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrt", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight diffusers pipeline folder")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="tiny",
                   help="tiny (fast tests), tiny-inpaint, tiny-sd2, tiny-sd2-base, tiny-sd-turbo, tiny-lcm, tiny-sdxl, "
                        "tiny-sdxl-turbo, tiny-sdxl-inpaint; sd15, sd2, sdxl (real shapes, random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("export", help="export a diffusers model folder to ONNX (ENGINE_DIR)")
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder")
    p.add_argument("--out", required=True, help="ENGINE_DIR to create")
    _add_size_range(p)
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: mixed precision with fp32 islands (see export/fp16.py); I/O stays float32")
    p.add_argument("--force", action="store_true", help="replace an existing ENGINE_DIR")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engines", help="build TensorRT engines (or ORT-optimized graphs) into an ENGINE_DIR")
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder (exported first if needed)")
    p.add_argument("--out", required=True, help="ENGINE_DIR (created or updated)")
    p.add_argument("--backend", required=True, choices=("tensorrt", "tensorrt-rtx", "ort-cpu", "ort-cuda"))
    for flag, what in (("--min-size", "smallest image side [256]"), ("--opt-size", "side TensorRT tunes for [512]"),
                       ("--max-size", "largest image side [1024]"), ("--max-batch", "most images per prompt [4]")):
        p.add_argument(flag, type=int, default=None, help=f"{what}; default: the existing artifact's")
    p.add_argument("--static", metavar="WxH", default=None, help="fix width and height (min=opt=max; batch stays)")
    p.add_argument("--builder-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    p.add_argument("--workspace", type=float, default=None, help="TensorRT workspace limit in GB")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="precision of the ONNX export")
    p.add_argument("--gpu-targets", default=None, help="TensorRT-RTX compute capabilities, e.g. sm86,sm89")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_build_engines)

    for mode in ("txt2img", "img2img", "inpaint"):
        p = sub.add_parser(mode, help=f"{mode} from an ENGINE_DIR (no torch needed)")
        p.add_argument("--engines", required=True, help="ENGINE_DIR written by `sdrt export`")
        p.add_argument("--prompt", required=True)
        p.add_argument("--negative-prompt", default="")
        p.add_argument("--steps", type=int, default=30)
        p.add_argument("--guidance", type=float, default=7.5)
        p.add_argument("--seed", type=int, default=None, help="default: random, printed")
        p.add_argument("--width", type=int, default=None, help="default: the artifact's opt size")
        p.add_argument("--height", type=int, default=None)
        p.add_argument("--scheduler", default=None, help="e.g. 'Euler a', 'DPM++ 2M Karras', DDIM")
        p.add_argument("--batch", type=int, default=1, help="images per prompt")
        p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
        _add_backend(p)
        if mode != "txt2img":
            p.add_argument("--image", required=True)
            p.add_argument("--strength", type=float, default=0.75 if mode == "img2img" else None,
                           help="how much of the image to redraw, in (0, 1] [img2img 0.75; inpaint as diffusers: "
                                "1.0, SDXL 0.9999]")
        if mode == "inpaint":
            p.add_argument("--mask", required=True, help="white = repaint, black = keep")
        p.add_argument("--out", required=True, help="output PNG (batch > 1 adds -1, -2, ...)")
        p.add_argument("--json", action="store_true", help="print per-stage timings as JSON")
        p.set_defaults(func=cmd_generate, mode=mode)

    p = sub.add_parser("verify", help="compare sdrt with the diffusers pipeline (needs torch)")
    p.add_argument("--model", required=True)
    p.add_argument("--engines", required=True)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="per-stage latency, cold start and peak RSS (optionally against diffusers)")
    p.add_argument("--engines", required=True, help="ENGINE_DIR written by `sdrt export`")
    p.add_argument("--width", type=int, default=None, help="default: the artifact's opt size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--scheduler", default=None, help="default: the model's own")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--mode", default="txt2img", help="txt2img or img2img (adds the VAE encoder)")
    p.add_argument("--strength", type=float, default=0.75, help="img2img strength")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=5, help="timed runs per system and point")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system and point before them")
    p.add_argument("--threads", type=int, default=None, help="threads for every system (default: usable cores)")
    _add_backend(p)
    p.add_argument("--compare-diffusers", metavar="MODEL_DIR", default=None,
                   help="also run the diffusers pipeline from this folder, alternating runs (needs torch)")
    p.add_argument("--sweep", action="store_true", help="resolutions 256/384/512 x batch 1/2/4 (within the artifact)")
    p.add_argument("--json", dest="json_out", metavar="FILE", default=None, help="write every measured field here")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="latency vs resolution plot (needs matplotlib)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
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
    return 1 if isinstance(result, dict) and result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
