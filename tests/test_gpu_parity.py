"""Whole images on the GPU path against diffusers (torch, fp32), same seed: the denoising loop in cupy with
the best GPU engine this machine has, named in the test id:

- ``tensorrt`` / ``tensorrt-rtx``: fp32 engines built here from the tiny model (UNet replayed from a CUDA graph);
- ``ort-cuda``: the exported ONNX on onnxruntime-gpu's CUDA provider, bound in place (IO binding);
- ``ort-cpu-engines``: neither installed, so the ORT-CPU engines behind the cupy loop (cupy in, cupy out):
  the loop (scheduler, CFG, inpaint blend, NaN guard) runs on the GPU, the engines on the host.

Reference: diffusers on CUDA (TF32 off, so it computes in fp32) when torch has CUDA and the engines run on
the GPU, else on the CPU. Bounds, image max abs in [0, 1]: 1e-4 with the CPU engines (as
tests/test_pipeline_parity.py); 5e-3 with GPU engines, whose fp32 convolutions and matrix products may run in
TF32 on Ampere and newer GPUs (TensorRT and ONNX Runtime's CUDA provider allow it by default). Skips without
cupy and an NVIDIA GPU, saying which engine would have run.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from sdrt.backends.cuda import CudaError, gpu_info
from sdrt.pipeline import Pipeline
from sdrt.specs import SizeRange

PROMPT = "a photo of a cat sitting on a red sofa"
SIZES = SizeRange(min_size=64, opt_size=128, max_size=256, max_batch=2)
BOUNDS = {"ort-cpu-engines": 1e-4, "ort-cuda": 5e-3, "tensorrt": 5e-3, "tensorrt-rtx": 5e-3}


def _engine_kind() -> str:
    try:
        gpu_info()
        gpu = True
    except CudaError:
        gpu = False
    for backend, module in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")):
        if gpu and importlib.util.find_spec(module):
            return backend
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return "ort-cuda"
    return "ort-cpu-engines"


ENGINE = _engine_kind()
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy():
    try:
        import cupy

        cupy.zeros(1).sum().get()
    except Exception as exc:  # not installed, or no driver / device
        why = "cupy is not installed" if isinstance(exc, ImportError) else str(exc).splitlines()[0]
        pytest.skip(f"needs cupy and an NVIDIA GPU for the cupy loop ({why}); the engines here would be {ENGINE}")
    return cupy


class CupyEngine:
    """A host engine fed and read as a GPU backend is: device feeds copied in, outputs as cupy arrays."""

    def __init__(self, engine, cupy):
        self.engine, self.cupy = engine, cupy

    def __call__(self, feeds: dict) -> dict:
        device = any(hasattr(v, "__cuda_array_interface__") for v in feeds.values())
        out = self.engine({k: self.cupy.asnumpy(v) if hasattr(v, "__cuda_array_interface__") else v
                           for k, v in feeds.items()})
        return {k: self.cupy.asarray(v) for k, v in out.items()} if device else out


@pytest.fixture(scope="module")
def gpu_pipeline(cupy, tiny_model_dir, tiny_engine_dir, tmp_path_factory):
    if ENGINE.startswith("tensorrt"):
        from sdrt_export.build_engines import build_engines

        out = tmp_path_factory.mktemp("gpu-parity") / "engines"
        build_engines(tiny_model_dir, out, ENGINE, sizes=SIZES, precision="fp32", progress=False)
        pipe = Pipeline(out, backend=ENGINE)
    elif ENGINE == "ort-cuda":
        pipe = Pipeline(tiny_engine_dir, backend="ort-cuda")
    else:
        pipe = Pipeline(tiny_engine_dir, xp=cupy)
        for name in list(pipe.manifest.specs.components):
            pipe._engines[name] = CupyEngine(pipe.engine(name), cupy)
    assert pipe.xp is cupy, "the loop must run in cupy"
    return pipe


@contextmanager
def _fp32(torch):
    """torch's CUDA matrix products and cuDNN convolutions in full fp32 (no TF32) for the reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """(diffusers pipeline factory for a mode, device it runs on)."""
    import torch

    from sdrt_export.verify import load_reference

    device = "cuda" if ENGINE != "ort-cpu-engines" and torch.cuda.is_available() else "cpu"
    pipes = {}

    def pipe(mode):
        if mode not in pipes:
            pipes[mode] = load_reference(tiny_model_dir, mode).to(device)
        return pipes[mode]

    return pipe, device


def _picture(width, height):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 3 % 256, y * 5 % 256, (x * y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _mask(width, height):
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 3:] = 255
    return Image.fromarray(mask)


CASES = [("txt2img", "DPM++ 2M Karras", {}), ("img2img", "Euler a", {"strength": 0.6}),
         ("inpaint", "UniPC", {"strength": 0.8})]


@pytest.mark.parametrize("mode,scheduler,extra", CASES, ids=[f"{ENGINE}-{c[0]}" for c in CASES])
def test_gpu_image_matches_diffusers(gpu_pipeline, reference, mode, scheduler, extra):
    import torch

    from sdrt_export.verify import reference_images, use_scheduler

    width, height = 96, 64
    inputs = dict(extra)
    if mode != "txt2img":
        inputs["image"] = _picture(width, height)
    if mode == "inpaint":
        inputs["mask"] = _mask(width, height)
    options = dict(negative_prompt="blurry", steps=5, guidance=7.5, seed=21, width=width, height=height, batch=2)
    pipe, device = reference
    ref = pipe(mode)
    use_scheduler(ref, scheduler)
    with _fp32(torch):
        expected = reference_images(ref, mode, PROMPT, **options, **inputs)
    generate = getattr(gpu_pipeline, mode)
    got = generate(prompt=PROMPT, scheduler=scheduler, **options, **inputs).unit_images
    assert got.shape == expected.shape
    error, bound = float(np.abs(got - expected).max()), BOUNDS[ENGINE]
    assert error <= bound, f"{ENGINE} {mode} {scheduler} vs diffusers on {device}: max abs {error:.3e} > {bound}"
    # the bound discriminates: the same request at guidance 9 moves the image by more than 3x the bound
    other = generate(prompt=PROMPT, scheduler=scheduler, **{**options, "guidance": 9.0}, **inputs).unit_images
    assert float(np.abs(other - expected).max()) > 3 * bound
