"""The parsers of the checking and measuring subcommands: ``sdrt verify``, ``sdrt bench``, ``sdrt info``
(``sdrt.cli`` builds the rest and runs them)."""

from __future__ import annotations

from sdrt import cli_args
from sdrt.cli_help import examples


def add_verify(sub, func) -> None:
    """The ``verify`` subcommand, run by ``func``."""
    p = sub.add_parser("verify", help="compare sdrt with the diffusers pipeline (needs torch)",
                       description="Run sdrt and the matching diffusers pipeline on the same inputs and compare the "
                                   "images; exits 1 when they differ beyond tolerance.",
                       epilog=examples("sdrt verify --model /tmp/model --engines /tmp/engines --scheduler 'Euler a' "
                                       "--steps 8"))
    g = p.add_argument_group("input and output")
    g.add_argument("--model", metavar="MODEL_DIR", required=True, help="the diffusers folder ENGINE_DIR came from")
    g.add_argument("--engines", metavar="ENGINE_DIR", required=True, help="written by `sdrt export`")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_argument_group("request")
    g.add_argument("--scheduler", default=None, help="default: the model's own")
    g.add_argument("--steps", type=int, default=4, help="denoising steps")
    g.add_argument("--width", type=int, default=None, help="default: the artifact's opt size")
    g.add_argument("--height", type=int, default=None, help="default: the artifact's opt size")
    g.add_argument("--seed", type=int, default=0, help="seed of both pipelines")
    g.add_argument("--prompt", default="a photo of a cat", help="prompt of both pipelines")
    g.add_argument("--prior", metavar="PRIOR_DIR", default=None,
                   help="Kandinsky 2.2: the prior folder, when --model is the decoder folder alone")
    g.add_argument("--controlnet", metavar="CONTROLNET_DIR", action="append", default=None,
                   help="check ControlNet: the folders ENGINE_DIR was exported with, in order (with --control-image)")
    g.add_argument("--control-image", metavar="IMG", action="append", default=None,
                   help="one per --controlnet (default: a synthetic picture)")
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", default=None,
                   help="run-time LoRA in sdrt vs diffusers' load_lora_weights + fuse_lora; repeatable")
    g.add_argument("--backend", choices=("ort-cpu", "openvino"), default="ort-cpu",
                   help="what runs sdrt's side; openvino in bf16 (its choice on AVX512_BF16 CPUs) is held to the "
                        "bf16 tolerance")
    p.set_defaults(func=func)


def add_bench(sub, func) -> None:
    """The ``bench`` subcommand, run by ``func``."""
    p = sub.add_parser("bench", help="per-stage latency, cold start and peak RSS (optionally against its CPU peers)",
                       description="Per stage p50/p90/p99/min, cold start and peak RSS, each system in its own "
                                   "process; with --compare (or --compare-diffusers) the systems run alternately, "
                                   "same thread count; the UNet also as GFLOP/s and share of this CPU's fp32 peak.",
                       epilog=examples("sdrt bench --engines engines/sd15 --steps 20",
                                       "sdrt bench --engines engines/sd15 --compare-diffusers ./sd15 --json out.json "
                                       "--plot out.png",
                                       "sdrt bench --engines engines/sd15 --compare diffusers,openvino,sdcpp "
                                       "--model ./sd15 --steps 2",
                                       "sdrt bench --engines engines/sd15 --sweep --runs 3"))
    g = p.add_argument_group("artifact and request")
    g.add_argument("--engines", metavar="ENGINE_DIR", required=True, help="written by `sdrt export`")
    g.add_argument("--width", type=int, default=None, help="default: the artifact's opt size")
    g.add_argument("--height", type=int, default=None, help="default: the artifact's opt size")
    g.add_argument("--steps", type=int, default=20, help="denoising steps")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--scheduler", default=None, help="default: the model's own")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--mode", default="txt2img", help="txt2img or img2img (adds the VAE encoder)")
    g.add_argument("--strength", type=float, default=0.75, help="img2img strength")
    g.add_argument("--seed", type=int, default=0, help="seed of every run")
    g = p.add_argument_group("measurement")
    g.add_argument("--runs", type=int, default=5, help="timed runs per system and point")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs per system and point before them")
    g.add_argument("--threads", type=int, default=None, help="threads for every system (default: usable cores)")
    cli_args.add_backend(g)
    g.add_argument("--sweep", action="store_true", help="resolutions 256/384/512 x batch 1/2/4 (within the artifact)")
    g.add_argument("--one-resident", action="store_true",
                   help="a fresh process per system and round, closed before the next starts: never two systems in "
                        "memory (SDXL fp32: ~14 GB each); every round is then also a cold start")
    g = p.add_argument_group("comparison and output")
    g.add_argument("--compare-diffusers", metavar="MODEL_DIR", default=None,
                   help="also run the diffusers pipeline from this folder, alternating runs (needs torch)")
    g.add_argument("--compare", metavar="PEERS", default=None,
                   help="comma-separated peers run alternately with sdrt on the same request and threads: "
                        "diffusers, openvino (the artifact's ONNX on OpenVINO), sdcpp (stable-diffusion.cpp), "
                        "or all; a peer not installed is skipped with the reason")
    g.add_argument("--model", metavar="MODEL_DIR", default=None,
                   help="the diffusers folder for the diffusers and sdcpp peers (default: the export's source)")
    g.add_argument("--json", dest="json_out", metavar="FILE", default=None, help="write every measured field here")
    g.add_argument("--plot", metavar="FILE.png", default=None, help="latency vs resolution plot (needs matplotlib)")
    p.set_defaults(func=func)


def add_info(sub, func) -> None:
    """The ``info`` subcommand, run by ``func``."""
    p = sub.add_parser("info", help="what an ENGINE_DIR holds; --verify checks every file's sha256",
                       description="Family, precision, size range and batch, scheduler, components, the engines or "
                                   "optimized graphs built per backend (and for which TensorRT / ONNX Runtime "
                                   "version and GPU), LoRAs merged. Reads the manifest only (no backend is loaded). "
                                   "With --verify, exits 1 when a file does not match its sha256; a missing or "
                                   "foreign folder exits 2.",
                       epilog=examples("sdrt info engines/tiny", "sdrt info engines/tiny --verify --json"))
    p.add_argument("engine_dir", metavar="ENGINE_DIR", help="folder written by `sdrt export`")
    p.add_argument("--verify", action="store_true", help="hash every recorded file and report each mismatch")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=func)
