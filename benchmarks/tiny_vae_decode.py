"""VAE decode alone at 512x512, batch 1: the full SD VAE (AutoencoderKL, SD1.x/2.x/SD-Turbo config) vs TAESD
(AutoencoderTiny), random weights, each exported with sdrt's wrappers and exporter call (dynamic axes) and run
by sdrt's ONNX Runtime backend, alternating, in one process. The fallback of ``tiny_vae.py`` when the whole
SD-Turbo-shaped export is out of reach (see NOTES.md).

    .venv/bin/python benchmarks/tiny_vae_decode.py [--runs 3] [--threads 2] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_vae import cpu_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--with-unet", action="store_true",
                        help="also time one SD-Turbo-shaped UNet call (SD2.1 UNet, batch 1: guidance 0) in the "
                             "alternation, for the end-to-end estimate UNet + decode")
    args = parser.parse_args()
    import diffusers

    from sdrt.backends.ort import OrtEngine
    from sdrt.specs import TINY_VAE_DECODER, UNET, VAE_DECODER, ModelDims, build_specs
    from sdrt_export.archs import SD2_TEXT, SD2_UNET, SD15_VAE, TAESD
    from sdrt_export.exporter import torch_export
    from sdrt_export.tiny_vae import TinyVaeDecoderWrapper, init_weights
    from sdrt_export.wrappers import VaeDecoderWrapper

    specs = build_specs(ModelDims(text_hidden_size=SD2_TEXT["hidden_size"], cross_attention_dim=SD2_UNET[
        "cross_attention_dim"], tiny_vae_latent_channels=4))
    torch.manual_seed(0)
    full = VaeDecoderWrapper(diffusers.AutoencoderKL(**SD15_VAE)).eval()
    tiny_vae = diffusers.AutoencoderTiny(**TAESD).eval()
    init_weights(tiny_vae, 0)
    tiny = TinyVaeDecoderWrapper(tiny_vae).eval()
    latent = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32)
    feeds = {VAE_DECODER: {"latent": latent}, TINY_VAE_DECODER: {"latent": latent}}
    modules = [(VAE_DECODER, full), (TINY_VAE_DECODER, tiny)]
    if args.with_unet:
        from sdrt_export.wrappers import UNetWrapper

        rng = np.random.default_rng(1)
        feeds[UNET] = {"sample": latent, "timestep": np.array([999.0], np.float32),
                       "encoder_hidden_states": rng.standard_normal((1, 77, 1024)).astype(np.float32)}
        modules.append((UNET, UNetWrapper(diffusers.UNet2DConditionModel(**SD2_UNET), specs[UNET].input_names)))
    engines = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, module in modules:
            path = Path(scratch) / f"{name}.onnx"
            torch_export(module.eval(), specs[name], list(feeds[name].values()), path, 17)
            del module
            engines[name] = OrtEngine(path, specs[name], threads=args.threads)
        del full, tiny, modules
        print("cpu:", cpu_info())
        samples = {name: [] for name in engines}
        for name, engine in engines.items():  # warm-up
            engine(feeds[name])
        for _ in range(args.runs):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine(feeds[name])
                samples[name].append(time.perf_counter() - start)
    for name, runs in samples.items():
        print(f"{name:>16}: median {statistics.median(runs):.3f} s  runs " + ", ".join(f"{r:.3f}" for r in runs))
    ratio = statistics.median(samples[TINY_VAE_DECODER]) / statistics.median(samples[VAE_DECODER])
    print(f"tiny / full VAE decode at {args.size}x{args.size}: {ratio:.4f}; loadavg after {os.getloadavg()}")
    if args.with_unet:  # one step, guidance 0: one UNet call, then the decode (text encoder not timed here)
        unet = statistics.median(samples[UNET])
        estimate = (unet + statistics.median(samples[TINY_VAE_DECODER])) / (unet + statistics.median(samples[VAE_DECODER]))
        print(f"UNet + decode, tiny / full: {estimate:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
