"""TensorRT runtime backend on a GPU (``make gpu-test``): engines built by ``sdrt build-engines`` against
torch fp16 and ONNX Runtime, CUDA-graph replay against eager runs, buffer and activation-memory reuse.
Everything here skips without an NVIDIA GPU, CUDA and tensorrt / tensorrt_rtx."""

from __future__ import annotations

import numpy as np
import pytest
from tests.gpu_trt import trt_gpu_backend

from sdrt.specs import SizeRange

BACKEND, WHY_NOT = trt_gpu_backend()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(BACKEND is None, reason=WHY_NOT)]
SIZES = SizeRange(min_size=64, opt_size=128, max_size=256, max_batch=2)


def _build(model_dir, out, precision):
    from sdrt.manifest import load_manifest
    from sdrt_export.build_engines import build_engines

    build_engines(model_dir, out, BACKEND, sizes=SIZES, precision=precision, progress=False)
    return load_manifest(out)


@pytest.fixture(scope="module")
def fp32_engines(tiny_model_dir, tmp_path_factory):
    return _build(tiny_model_dir, tmp_path_factory.mktemp("trt") / "fp32", "fp32")


@pytest.fixture(scope="module")
def fp16_engines(tiny_model_dir, tmp_path_factory):
    return _build(tiny_model_dir, tmp_path_factory.mktemp("trt") / "fp16", "fp16")


def _feeds(spec, batch=2, height=64, width=96, seed=0):
    from sdrt_export.checks import random_inputs

    return dict(zip(spec.input_names, random_inputs(spec, batch, height, width, np.random.default_rng(seed))))


def test_engine_matches_torch_fp16_per_component(fp16_engines, tiny_model_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"needs torch with CUDA for the fp16 reference (torch {torch.__version__} here; "
                    "`make gpu-test` runs under a python that has one, see the Makefile)")
    from sdrt.backends import open_engine
    from sdrt_export.checks import relative_error
    from sdrt_export.wrappers import load_component

    for spec in fp16_engines.specs:
        feeds = _feeds(spec)
        module = load_component(tiny_model_dir, spec.name).half().cuda()
        args = [torch.from_numpy(a).cuda().half() if a.dtype.kind == "f" else torch.from_numpy(a).cuda()
                for a in feeds.values()]
        with torch.inference_mode():
            want = module(*args)
        want = want if isinstance(want, tuple) else (want,)
        got = open_engine(fp16_engines, spec.name, BACKEND)(feeds)
        for name, reference in zip(spec.output_names, want):
            error = relative_error(got[name], reference.float().cpu().numpy())
            assert error <= 1e-2, f"{spec.name}.{name}: relative L2 error {error:.3g} vs torch fp16"
        del module
        torch.cuda.empty_cache()


def test_fp32_engine_matches_onnx_runtime(fp32_engines):
    from sdrt.backends import open_engine
    from sdrt_export.checks import relative_error

    for spec in fp32_engines.specs:
        feeds = _feeds(spec, batch=1, height=64, width=64)
        got, want = open_engine(fp32_engines, spec.name, BACKEND)(feeds), open_engine(fp32_engines, spec.name)(feeds)
        for name in spec.output_names:
            assert relative_error(got[name], want[name]) <= 1e-3, f"{spec.name}.{name}"


def test_cuda_graph_replay_equals_eager(fp32_engines):
    from sdrt.backends import open_engine

    spec = fp32_engines.specs["unet"]
    eager = open_engine(fp32_engines, "unet", BACKEND)
    graphed = open_engine(fp32_engines, "unet", BACKEND, cuda_graph=True)
    for seed, (height, width) in enumerate([(64, 64), (64, 96), (64, 64)]):  # new shape, then back to one seen
        feeds = _feeds(spec, 2, height, width, seed)
        want = eager(feeds)
        first, replayed = graphed(feeds), graphed(feeds)
        for name in spec.output_names:
            np.testing.assert_array_equal(first[name], want[name])
            np.testing.assert_array_equal(replayed[name], want[name])


def test_buffers_and_activation_memory_are_reused(fp32_engines, monkeypatch):
    import sdrt.backends.tensorrt as trt_backend
    from sdrt.backends import open_engine

    engines = {spec.name: open_engine(fp32_engines, spec.name, BACKEND) for spec in fp32_engines.specs}
    needed = max(getattr(e.engine, "device_memory_size_v2", 0) or e.engine.device_memory_size for e in engines.values())
    assert trt_backend._ACTIVATIONS.size >= needed
    for name, engine in engines.items():
        engine(_feeds(fp32_engines.specs[name]))
    allocations = []
    monkeypatch.setattr(trt_backend._cuda(), "alloc", lambda n: allocations.append(n) or pytest.fail("allocated"))
    for _ in range(2):
        for name, engine in engines.items():
            engine(_feeds(fp32_engines.specs[name]))
    assert allocations == []


def test_cupy_feeds_give_cupy_outputs_equal_to_numpy(fp32_engines, cupy):
    from sdrt.backends import open_engine

    spec = fp32_engines.specs["vae_decoder"]
    engine, feeds = open_engine(fp32_engines, "vae_decoder", BACKEND), _feeds(spec)
    on_host = engine(feeds)
    on_device = engine({k: cupy.asarray(v) for k, v in feeds.items()})
    for name in spec.output_names:
        assert isinstance(on_device[name], cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(on_device[name]), on_host[name])


def test_engine_runs_in_another_thread_than_it_was_opened_in(fp32_engines):
    """As ``sdrt serve`` runs them: engines opened in one thread, run in a fresh worker thread."""
    from concurrent.futures import ThreadPoolExecutor

    from sdrt.backends import open_engine

    spec = fp32_engines.specs["unet"]
    engine, feeds = open_engine(fp32_engines, "unet", BACKEND, cuda_graph=True), _feeds(spec)
    want = engine(feeds)
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(engine, feeds).result(timeout=300)
    for name in spec.output_names:
        np.testing.assert_array_equal(got[name], want[name])
