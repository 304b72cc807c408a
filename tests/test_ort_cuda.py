"""The ORT-CUDA backend (``sdrt.backends.ort.OrtEngine`` with ``device="cuda"``).

On the CPU: the real ONNX Runtime runs the tiny model's graphs on its CPU provider; faked are only the
CUDA provider's presence (the session says it has it) and device memory, which is host memory posing as
cupy arrays. The IO binding is the real one, seen through a recorder that hands the 'cuda' buffers to it
as CPU buffers, so the shapes, dtypes and pointers the backend binds are checked by ONNX Runtime itself
and the outputs land where the backend allocated them. The last test runs onnxruntime-gpu on a GPU.
Also here: ``sdrt.backends.cuda`` (the driver calls of the TensorRT backend) used from several threads.
"""

from __future__ import annotations

import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime
import pytest

import sdrt.backends.cuda as cuda_driver
import sdrt.backends.ort as ort_backend
from sdrt.backends import open_engine
from sdrt.errors import InputError
from sdrt.manifest import load_manifest

CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


class DeviceArray:
    """Host memory posing as a cupy array: the attributes the backend reads (shape, dtype, device.id,
    data.ptr and ``__cuda_array_interface__``)."""

    def __init__(self, host: np.ndarray, registry: dict):
        self.host = host
        self.device = types.SimpleNamespace(id=0)
        self.data = types.SimpleNamespace(ptr=host.ctypes.data)
        registry[self.data.ptr] = self

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "version": 3}


def fake_cupy(events: list, registry: dict) -> types.ModuleType:
    """The four cupy calls the backend makes, on ``DeviceArray``; a stream sync is recorded in ``events``."""
    cupy = types.ModuleType("cupy")

    def asarray(x):
        return x if isinstance(x, DeviceArray) else DeviceArray(np.array(x), registry)  # a host-to-device copy

    def ascontiguousarray(a, dtype=None):
        if a.host.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        return DeviceArray(np.ascontiguousarray(a.host, dtype=dtype), registry)

    def empty(shape, dtype):  # poisoned, so an output ONNX Runtime did not write shows
        host = np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.empty(shape, dtype)
        return DeviceArray(host, registry)

    stream = types.SimpleNamespace(synchronize=lambda: events.append(("stream sync",)))
    cupy.asarray, cupy.ascontiguousarray, cupy.empty = asarray, ascontiguousarray, empty
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    return cupy


class RecordingBinding:
    """The real IOBinding; every call recorded, 'cuda' buffers handed to it as CPU ones."""

    def __init__(self, real, events: list):
        self.real, self.events = real, events

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.events.append(("bind_input", name, device_type, device_id, np.dtype(element_type), tuple(shape),
                            buffer_ptr))
        self.real.bind_input(name, "cpu", 0, element_type, shape, buffer_ptr)

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        self.events.append(("bind_output", name, device_type, device_id,
                            None if element_type is None else np.dtype(element_type),
                            None if shape is None else tuple(shape), buffer_ptr))
        if buffer_ptr is None:
            self.real.bind_output(name, "cpu")
        else:
            self.real.bind_output(name, "cpu", 0, element_type, shape, buffer_ptr)

    def bind_cpu_input(self, name, array):
        self.events.append(("bind_cpu_input", name, array))
        self.real.bind_cpu_input(name, array)

    def synchronize_outputs(self):
        self.events.append(("synchronize_outputs",))
        self.real.synchronize_outputs()

    def copy_outputs_to_cpu(self):
        self.events.append(("copy_outputs_to_cpu",))
        return self.real.copy_outputs_to_cpu()


def fake_onnxruntime(events: list, started: bool = True, available: bool = True) -> types.ModuleType:
    """onnxruntime with a CUDA provider in name only: sessions are real CPU sessions. ``started=False``:
    the session falls back to the CPU as onnxruntime-gpu does when CUDA or cuDNN fail to load."""
    ort = types.ModuleType("onnxruntime")
    ort.__dict__.update({k: v for k, v in vars(onnxruntime).items() if not k.startswith("__")})
    ort.__version__ = onnxruntime.__version__

    class Session:
        def __init__(self, path, options, providers):
            assert providers == CUDA_PROVIDERS
            self.real = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def get_inputs(self):
            return self.real.get_inputs()

        def get_providers(self):
            return CUDA_PROVIDERS if started else ["CPUExecutionProvider"]

        def io_binding(self):
            return RecordingBinding(self.real.io_binding(), events)

        def run_with_iobinding(self, binding):
            events.append(("run_with_iobinding",))
            self.real.run_with_iobinding(binding.real)

        def run(self, *args):
            pytest.fail("the CUDA provider must run through IO binding")

    ort.InferenceSession = Session
    ort.get_available_providers = lambda: CUDA_PROVIDERS if available else ["CPUExecutionProvider"]
    return ort


@pytest.fixture
def cuda(monkeypatch):
    """(events, registry of device arrays by pointer, fake cupy) with the fakes installed."""
    events, registry = [], {}
    cupy = fake_cupy(events, registry)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(ort_backend, "ort", fake_onnxruntime(events))
    monkeypatch.delenv(ort_backend.CACHE_ENV, raising=False)
    return events, registry, cupy


def _feeds(spec, seed=0, batch=2, height=64, width=96):
    from sdrt_export.checks import random_inputs

    return dict(zip(spec.input_names, random_inputs(spec, batch, height, width, np.random.default_rng(seed))))


def _reference(manifest, name, feeds) -> dict:
    """The component's graph run by onnxruntime itself on the CPU, past sdrt's backend."""
    spec = manifest.specs[name]
    session = onnxruntime.InferenceSession(str(manifest.verified_path(name)), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {t.name: np.asarray(feeds[t.name], t.dtype) for t in spec.inputs})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_device_feeds_are_bound_in_place_and_outputs_allocated_on_the_device(tiny_engine_dir, cuda, name):
    events, registry, _ = cuda
    manifest = load_manifest(tiny_engine_dir)
    spec = manifest.specs[name]
    host = _feeds(spec)
    want = _reference(manifest, name, host)
    engine = open_engine(manifest, name, "ort-cuda")
    assert engine.device == "cuda"
    # one feed in the spec's dtype and layout (bound in place), the others needing a conversion on the device
    first, *others = spec.input_names
    feeds = {first: DeviceArray(host[first], registry)}
    for other in others:
        feeds[other] = DeviceArray(np.asfortranarray(host[other].astype(np.float64)), registry)
    if host[first].dtype == np.int32:  # text encoders: int64 ids, converted to the spec's int32
        feeds[first] = DeviceArray(host[first].astype(np.int64), registry)
    got = engine(feeds)

    kinds = [e[0] for e in events]
    assert kinds == ["bind_input"] * len(spec.inputs) + ["bind_output"] * len(spec.outputs) + [
        "stream sync", "run_with_iobinding", "synchronize_outputs"]
    for _, tensor, device, device_id, dtype, shape, ptr in events[:len(spec.inputs)]:
        assert (device, device_id, dtype, shape) == ("cuda", 0, np.dtype(spec.tensor(tensor).dtype),
                                                     host[tensor].shape), tensor
        bound = registry[ptr].host
        assert bound.flags.c_contiguous
        np.testing.assert_array_equal(bound, host[tensor])
        if feeds[tensor].dtype == spec.tensor(tensor).dtype and feeds[tensor].host.flags.c_contiguous:
            assert ptr == feeds[tensor].data.ptr, f"{tensor} was copied, not bound in place"
    assert sorted(got) == sorted(spec.output_names)
    for _, tensor, device, device_id, dtype, shape, ptr in events[len(spec.inputs):len(spec.inputs) + len(got)]:
        assert isinstance(got[tensor], DeviceArray) and ptr == got[tensor].data.ptr
        assert (device, device_id, dtype, shape) == ("cuda", 0, np.float32, want[tensor].shape), tensor
        np.testing.assert_allclose(got[tensor].host, want[tensor], rtol=1e-6, atol=1e-6, err_msg=tensor)


def test_host_feeds_are_bound_as_cpu_inputs_and_copied_back(tiny_engine_dir, cuda):
    events, registry, _ = cuda
    manifest = load_manifest(tiny_engine_dir)
    spec = manifest.specs["unet"]
    host = _feeds(spec, seed=1)
    feeds = {**host, "timestep": [float(t) for t in host["timestep"]]}  # a list: converted to float32
    got = open_engine(manifest, "unet", "ort-cuda")(feeds)
    assert [e[0] for e in events] == ["bind_cpu_input"] * 3 + ["bind_output", "run_with_iobinding",
                                                                "copy_outputs_to_cpu"]
    for _, tensor, array in events[:3]:
        assert isinstance(array, np.ndarray) and array.flags.c_contiguous
        assert array.dtype == np.dtype(spec.tensor(tensor).dtype)
    assert events[3][1:3] == ("out_sample", "cpu") and events[3][-1] is None  # ONNX Runtime allocates it
    assert registry == {} and isinstance(got["out_sample"], np.ndarray)
    want = _reference(manifest, "unet", feeds)
    np.testing.assert_allclose(got["out_sample"], want["out_sample"], rtol=1e-6, atol=1e-6)


def test_mixed_feeds_go_to_the_device(tiny_engine_dir, cuda):
    """A device sample with host timesteps and embeddings (as the loop may pass): all bound on the device."""
    events, registry, cupy = cuda
    manifest = load_manifest(tiny_engine_dir)
    spec = manifest.specs["unet"]
    host = _feeds(spec, seed=2)
    got = open_engine(manifest, "unet", "ort-cuda")({**host, "sample": cupy.asarray(host["sample"])})
    binds = [e for e in events if e[0] == "bind_input"]
    assert sorted(e[1] for e in binds) == sorted(spec.input_names)
    for _, tensor, device, *_, ptr in binds:
        assert device == "cuda" and ptr in registry and ptr != host[tensor].ctypes.data
    assert isinstance(got["out_sample"], DeviceArray)
    assert not np.isnan(got["out_sample"].host).any()


def test_missing_feed_is_an_input_error(tiny_engine_dir, cuda):
    _, _, cupy = cuda
    manifest = load_manifest(tiny_engine_dir)
    host = _feeds(manifest.specs["unet"])
    engine = open_engine(manifest, "unet", "ort-cuda")
    for feeds in ({"sample": host["sample"]}, {"sample": cupy.asarray(host["sample"])}):
        with pytest.raises(InputError, match="unet: missing input 'timestep'"):
            engine(feeds)


@pytest.mark.parametrize("available,started,message", [
    (False, True, "backend ort-cuda needs onnxruntime-gpu and a CUDA device"),
    (True, False, "ONNX Runtime could not start its CUDA provider"),
])
def test_without_a_working_cuda_provider_ort_cuda_is_refused(tiny_engine_dir, monkeypatch, available, started,
                                                              message):
    monkeypatch.setattr(ort_backend, "ort", fake_onnxruntime([], started=started, available=available))
    with pytest.raises(InputError, match=message):
        open_engine(load_manifest(tiny_engine_dir), "unet", "ort-cuda")


class FakeDriver:
    """libcuda as ``Cuda`` calls it: one primary context, current per thread as in the driver; calls that
    need one fail with CUDA_ERROR_INVALID_CONTEXT (201) in a thread where it is not current."""

    PRIMARY = 0xC0DE

    def __init__(self):
        self.local, self.made_current = threading.local(), []

    def __getattr__(self, name):
        def call(*args):
            out = getattr(args[0], "_obj", None)  # the byref() output argument, where there is one
            current = getattr(self.local, "context", None)
            if name == "cuCtxSetCurrent":
                self.local.context = getattr(args[0], "value", args[0])  # a c_void_p or its int
                self.made_current.append(threading.current_thread().name)
            elif name == "cuCtxGetCurrent":
                out.value = current
            elif name == "cuGetErrorString":
                args[1]._obj.value = b"invalid device context"
            elif name in ("cuDeviceGet", "cuDevicePrimaryCtxRetain"):
                out.value = args[1] if name == "cuDeviceGet" else self.PRIMARY
            elif current != self.PRIMARY:
                return 201
            elif out is not None:
                out.value = 4096  # a stream or an allocation
            return 0

        return call


def test_cuda_driver_calls_work_from_any_thread(monkeypatch):
    """The context is made current in a thread that has none (once per thread, not per call)."""
    fake = FakeDriver()
    monkeypatch.setattr(cuda_driver, "driver", lambda: fake)
    monkeypatch.setitem(sys.modules, "cupy", None)  # driver allocations, not cupy's pool
    cuda = cuda_driver.Cuda()

    def work():
        ptr = cuda.alloc(1024)
        cuda.to_device(ptr, 0, 16), cuda.to_host(0, ptr, 16), cuda.copy(ptr, ptr, 16)
        cuda.launch(5), cuda.synchronize(), cuda.free(ptr)
        return threading.current_thread().name

    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        worker = pool.submit(work).result(timeout=30)
        assert pool.submit(work).result(timeout=30) == worker
    work()
    assert fake.made_current == [threading.current_thread().name, worker]


def _gpu_provider_reason() -> str | None:
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return (f"needs onnxruntime-gpu (this onnxruntime {onnxruntime.__version__} has "
                f"{', '.join(onnxruntime.get_available_providers())}), cupy and an NVIDIA GPU")
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_provider_reason() is not None, reason=_gpu_provider_reason() or "")
def test_ort_cuda_on_a_gpu_matches_ort_cpu(tiny_engine_dir, cupy):
    """Every component on the real CUDA provider: host feeds vs ORT-CPU, and cupy feeds giving cupy outputs
    equal to the host-fed run. rel L2 <= 1e-3: ORT's CUDA provider may run fp32 convolutions and matrix
    products in TF32 on Ampere and newer GPUs."""
    from sdrt_export.checks import relative_error

    manifest = load_manifest(tiny_engine_dir)
    for spec in manifest.specs:
        feeds = _feeds(spec, seed=3)
        engine = open_engine(manifest, spec.name, "ort-cuda")
        assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
        on_host, want = engine(feeds), open_engine(manifest, spec.name, "ort-cpu")(feeds)
        on_device = engine({k: cupy.asarray(v) for k, v in feeds.items()})
        for name in spec.output_names:
            error = relative_error(on_host[name], want[name])
            assert error <= 1e-3, f"{spec.name}.{name}: rel L2 {error:.3g} vs ORT-CPU"
            assert isinstance(on_device[name], cupy.ndarray)
            np.testing.assert_allclose(cupy.asnumpy(on_device[name]), on_host[name], rtol=1e-5, atol=1e-6)
