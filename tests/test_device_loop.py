"""The denoising loop on a device array namespace, with array_api_strict standing in for cupy.

Engines are wrapped to take and give array_api_strict arrays, as the TensorRT and ORT-CUDA backends take
and give cupy arrays. The images must equal the numpy loop's, and the loop must not read device arrays
back on the host per step: every device-to-host crossing is counted, and the count may not grow with the
number of steps (the NaN/inf guard's per-step sums and the decoded image cross once each).
Also: which namespace GPU backends get (cupy only when it sees a device), and, on a GPU, the loop in cupy.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from sdrt.errors import NumericsError
from sdrt.pipeline import Pipeline
from sdrt.specs import UNET

try:  # the stand-in for cupy; the cupy tests below do not need it
    import array_api_strict as xs

    Array = type(xs.asarray(np.zeros(1, np.float32)))
except ImportError:
    xs = Array = None

CROSSINGS = ("__array__", "__float__", "__bool__", "__int__", "__index__", "__dlpack__", "__complex__")


class DeviceEngine:
    """A host engine seen as a device one: device feeds in, device outputs out."""

    def __init__(self, engine, poison_call: int | None = None):
        self.engine, self.poison_call, self.calls = engine, poison_call, 0

    def __call__(self, feeds: dict) -> dict:
        device = any(isinstance(v, Array) for v in feeds.values())
        out = self.engine({k: v._array if isinstance(v, Array) else v for k, v in feeds.items()})
        self.calls += 1
        if self.calls == self.poison_call:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return {k: xs.asarray(v) for k, v in out.items()} if device else out


@pytest.fixture
def crossings(monkeypatch):
    if xs is None:
        pytest.skip("needs array_api_strict (pip install array-api-strict; part of the test extra)")
    """Counts every conversion of an array_api_strict array to a host value."""
    counts = {"n": 0}
    for name in CROSSINGS:
        original = getattr(Array, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Array, name, counted)
    return counts


def device_pipeline(engine_dir, **poison) -> Pipeline:
    pipe = Pipeline(engine_dir, xp=xs)
    for name in list(pipe.manifest.specs.components):
        pipe._engines[name] = DeviceEngine(pipe.engine(name), **(poison if name == UNET else {}))
    return pipe


def picture(width: int, height: int):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 3 % 256, y * 5 % 256, (x + y) % 256], -1).astype(np.uint8))


def mask(width: int, height: int):
    from PIL import Image

    m = np.zeros((height, width), np.uint8)
    m[height // 4: 3 * height // 4, width // 3:] = 255
    return Image.fromarray(m)


CASES = [("txt2img", "PNDMScheduler"), ("txt2img", "Euler a"), ("txt2img", "DPM++ 2M Karras"),
         ("img2img", "DDIM"), ("inpaint", "UniPC")]


@pytest.mark.parametrize("mode,scheduler", CASES)
def test_device_loop_equals_host_loop_without_per_step_readback(tiny_engine_dir, crossings, mode, scheduler):
    host, device = Pipeline(tiny_engine_dir), device_pipeline(tiny_engine_dir)
    args = {"txt2img": (), "img2img": (picture(96, 64),), "inpaint": (picture(96, 64), mask(96, 64))}[mode]
    counts = []
    for steps in (3, 6):
        options = dict(steps=steps, guidance=5.0, seed=11, width=96, height=64, scheduler=scheduler, batch=2,
                       negative_prompt="blurry")
        want = getattr(host, mode)(*args, "a red fox", **options)
        before = crossings["n"]
        got = getattr(device, mode)(*args, "a red fox", **options)
        counts.append(crossings["n"] - before)
        np.testing.assert_allclose(got.unit_images, want.unit_images, rtol=0, atol=1e-6)
    assert counts[0] == counts[1] <= 2, f"device-to-host crossings per generation: {counts}"


def test_device_nan_guard_names_the_step(tiny_engine_dir, crossings):
    device = device_pipeline(tiny_engine_dir, poison_call=3)
    with pytest.raises(NumericsError, match=r"latents at step 3/5"):
        device.txt2img("a cat", steps=5, guidance=1.0, seed=0, width=64, height=64, scheduler="Euler")


def _cupy_module(devices):
    """A stand-in for cupy as ``loop_namespace`` probes it: ``devices`` GPUs, or an exception to raise."""
    def count():
        if isinstance(devices, Exception):
            raise devices
        return devices

    return types.SimpleNamespace(__name__="cupy", cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=count)))


@pytest.mark.parametrize("backend", ["ort-cpu", "ort-cuda", "tensorrt", "tensorrt-rtx"])
def test_loop_namespace_picks_cupy_for_gpu_backends_with_a_device(monkeypatch, backend):
    from sdrt.arrays import GPU_BACKENDS, loop_namespace

    cupy = _cupy_module(1)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert loop_namespace(backend) is (cupy if backend in GPU_BACKENDS else np)
    requested = types.SimpleNamespace(__name__="some array namespace")
    assert loop_namespace(backend, requested) is requested  # an explicit namespace wins
    for absent in (_cupy_module(0), _cupy_module(RuntimeError("cudaErrorNoDevice: no CUDA-capable device")), None):
        monkeypatch.setitem(sys.modules, "cupy", absent)  # None: not installed (import raises ImportError)
        assert loop_namespace(backend) is np


def test_pipeline_runs_its_gpu_loop_in_cupy_when_present(tiny_engine_dir, monkeypatch):
    cupy = _cupy_module(1)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert Pipeline(tiny_engine_dir, backend="tensorrt").xp is cupy  # opening engines waits for the first use
    assert Pipeline(tiny_engine_dir, backend="ort-cuda").xp is cupy
    assert Pipeline(tiny_engine_dir).xp is np


class CupyEngine:
    """A host (ORT CPU) engine fed and read as a GPU backend is: cupy in, cupy out."""

    def __init__(self, engine, cupy):
        self.engine, self.cupy = engine, cupy

    def __call__(self, feeds: dict) -> dict:
        device = any(hasattr(v, "__cuda_array_interface__") for v in feeds.values())
        out = self.engine({k: v.get() if hasattr(v, "__cuda_array_interface__") else v for k, v in feeds.items()})
        return {k: self.cupy.asarray(v) for k, v in out.items()} if device else out


@pytest.mark.gpu
@pytest.mark.parametrize("mode,scheduler", CASES)
def test_cupy_loop_equals_host_loop(cupy, tiny_engine_dir, mode, scheduler):
    """The same loop with latents, feeds and scheduler state as cupy arrays on the GPU."""
    host, device = Pipeline(tiny_engine_dir), Pipeline(tiny_engine_dir, xp=cupy)
    for name in list(device.manifest.specs.components):
        device._engines[name] = CupyEngine(device.engine(name), cupy)
    args = {"txt2img": (), "img2img": (picture(96, 64),), "inpaint": (picture(96, 64), mask(96, 64))}[mode]
    options = dict(steps=4, guidance=5.0, seed=11, width=96, height=64, scheduler=scheduler, batch=2)
    want = getattr(host, mode)(*args, "a red fox", **options)
    got = getattr(device, mode)(*args, "a red fox", **options)
    np.testing.assert_allclose(got.unit_images, want.unit_images, rtol=0, atol=1e-5)
