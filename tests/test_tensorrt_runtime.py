"""The TensorRT backend's own logic on the CPU, against a stand-in for TensorRT and CUDA (the real ones
run in test_tensorrt_gpu.py): trust checks, shape binding only on change, buffers allocated once, CUDA
graph capture and replay, activation memory shared by engines and rebound when it grows."""

from __future__ import annotations

import ctypes
import json
import shutil
import types

import numpy as np
import pytest

import sdrt.backends.tensorrt as trt_backend
from sdrt.backends import open_engine
from sdrt.backends.cuda import GpuInfo
from sdrt.errors import ArtifactError, InputError
from sdrt.manifest import file_record, load_manifest


class FakeCuda:
    """Host memory standing in for device memory; graphs are lists of recorded kernels."""

    def __init__(self):
        self.stream, self.blocks, self.capturing, self.graphs = 7, {}, None, {}
        self.allocations = self.launches = 0

    def alloc(self, nbytes):
        block = ctypes.create_string_buffer(max(int(nbytes), 256))
        self.blocks[ctypes.addressof(block)] = block
        self.allocations += 1
        return ctypes.addressof(block)

    def free(self, ptr):
        del self.blocks[ptr]

    def to_device(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)

    to_host = copy = to_device

    def synchronize(self):
        pass

    def capture(self, work):
        self.capturing = []
        work()
        self.graphs[len(self.graphs) + 1], self.capturing = self.capturing, None
        return len(self.graphs)

    def launch(self, graph):
        self.launches += 1
        for kernel in self.graphs[graph]:
            kernel()

    def destroy_graph(self, graph):
        del self.graphs[graph]


def _view(ptr, shape):
    return np.ctypeslib.as_array((ctypes.c_float * int(np.prod(shape))).from_address(ptr)).reshape(shape)


class FakeContext:
    """A 'UNet' computing out_sample = 2 * sample + timestep."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None
        self.shape_calls = self.executions = 0

    def set_input_shape(self, name, shape):
        self.shape_calls += 1
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["sample"]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def update_device_memory_size_for_shapes(self):
        return 1000 * self.shapes["sample"][0]

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def execute_async_v3(self, stream):
        assert self.memory and self.memory[1] >= self.update_device_memory_size_for_shapes()
        shape, addresses = self.shapes["sample"], dict(self.addresses)

        def kernel():
            sample, t = _view(addresses["sample"], shape), _view(addresses["timestep"], shape[:1])
            _view(addresses["out_sample"], shape)[...] = 2 * sample + t[:, None, None, None]

        self.executions += 1
        if self.engine.cuda.capturing is None:
            kernel()
        else:
            self.engine.cuda.capturing.append(kernel)
        return True


class FakeEngine:
    names = ("sample", "timestep", "encoder_hidden_states", "out_sample")
    device_memory_size_v2 = 4000  # what the largest batch (4) needs

    def __init__(self, cuda, profile):
        self.cuda, self.profile, self.num_io_tensors = cuda, profile, 4

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "output" if name == "out_sample" else "input"

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_profile_shape(self, name, index):
        return self.profile[name]

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        self.context = FakeContext(self)
        return self.context


class FakeLogger:
    WARNING = 2

    def __init__(self, level):
        self.level = level


def fake_trt(cuda, profile, deserialized):
    def runtime(logger):
        return types.SimpleNamespace(deserialize_cuda_engine=lambda data: deserialized.append(data) or FakeEngine(
            cuda, profile))

    return types.SimpleNamespace(
        __name__="tensorrt", __version__="10.99", Logger=FakeLogger, Runtime=runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="input"), nptype=lambda dtype: dtype,
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user-managed"))


@pytest.fixture()
def setup(tiny_engine_dir, tmp_path, monkeypatch):
    """A copy of tiny_engine_dir with a (fake) TensorRT unet engine recorded for compute capability 8.9."""
    out = tmp_path / "e"
    shutil.copytree(tiny_engine_dir, out)
    (out / "tensorrt").mkdir()
    (out / "tensorrt" / "unet.engine").write_bytes(b"fake engine")
    data = json.loads((out / "manifest.json").read_text())
    profile = {k: [list(s) for s in v] for k, v in load_manifest(out).specs["unet"].profile(
        load_manifest(out).sizes).items()}
    data["engines"] = {"tensorrt": {"command": "sdrt build-engines --backend tensorrt", "components": {"unet": {
        "files": [file_record(out, "tensorrt/unet.engine")], "onnx_sha256": load_manifest(out).onnx_digest("unet"),
        "flavour": "tensorrt", "version": "10.99", "compute_capability": "8.9", "profile": profile}}}}
    (out / "manifest.json").write_text(json.dumps(data))
    cuda, deserialized = FakeCuda(), []
    monkeypatch.setattr(trt_backend, "import_flavour", lambda backend: fake_trt(cuda, profile, deserialized))
    monkeypatch.setattr(trt_backend, "gpu_info", lambda: GpuInfo("Fake GPU", "8.9", 13000))
    monkeypatch.setattr(trt_backend, "_cuda", lambda: cuda)
    monkeypatch.setattr(trt_backend, "_ACTIVATIONS", trt_backend._Activations())
    return load_manifest(out), cuda, deserialized


def _feeds(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, size // 8, size // 8)).astype(np.float32),
            "timestep": np.full((batch,), 10 * seed + 1, np.float32),
            "encoder_hidden_states": np.zeros((batch, 77, 32), np.float32)}


def _expected(feeds):
    return 2 * feeds["sample"] + feeds["timestep"][:, None, None, None]


def test_runs_eagerly_binding_shapes_only_when_they_change(setup):
    manifest, cuda, deserialized = setup
    engine = open_engine(manifest, "unet", "tensorrt")
    assert deserialized == [b"fake engine"]
    allocated, context = cuda.allocations, engine.context
    calls = [_feeds(2, 64, 0), _feeds(2, 64, 1), _feeds(1, 128, 2), _feeds(2, 64, 3)]
    shape_calls = []
    for feeds in calls:
        np.testing.assert_array_equal(engine(feeds)["out_sample"], _expected(feeds))
        shape_calls.append(context.shape_calls)
    assert cuda.allocations == allocated  # I/O buffers were allocated once, at open
    assert np.diff([shape_calls[0] - 3, *shape_calls]).tolist() == [3, 0, 3, 3]
    with pytest.raises(InputError, match="this engine serves"):
        engine(_feeds(1, 512))
    with pytest.raises(InputError, match="missing input 'timestep'"):
        engine({"sample": calls[0]["sample"]})


def test_cuda_graph_is_captured_once_per_shape_and_replayed(setup):
    manifest, cuda, _ = setup
    engine = open_engine(manifest, "unet", "tensorrt", cuda_graph=True)
    for seed, (batch, size) in enumerate([(2, 64), (2, 64), (1, 128), (2, 64), (1, 128)]):
        feeds = _feeds(batch, size, seed)
        np.testing.assert_array_equal(engine(feeds)["out_sample"], _expected(feeds))
    assert len(cuda.graphs) == 2 and cuda.launches == 3
    assert engine.context.executions == 4  # per new shape: one eager run, one captured


def test_activation_memory_is_shared_and_rebound_when_it_grows(setup, monkeypatch):
    manifest, cuda, _ = setup
    monkeypatch.setattr(FakeEngine, "device_memory_size_v2", 1500)  # an engine that underestimates
    first = open_engine(manifest, "unet", "tensorrt", cuda_graph=True)
    second = open_engine(manifest, "unet", "tensorrt")
    pool = trt_backend._ACTIVATIONS
    assert pool.size == 1500
    first(_feeds(1, 64))
    assert first.context.memory == (pool.ptr, 1500) and len(cuda.graphs) == 1
    second(_feeds(2, 64))  # needs 2000 bytes: the shared buffer grows
    assert pool.size == 2000 and second.context.memory == (pool.ptr, 2000)
    feeds = _feeds(1, 64, 5)
    np.testing.assert_array_equal(first(feeds)["out_sample"], _expected(feeds))
    assert first.context.memory == (pool.ptr, 2000)  # rebound, and its stale graph re-captured
    assert len(cuda.graphs) == 1 and cuda.launches == 0


def test_other_gpu_is_refused_before_deserializing(setup, monkeypatch):
    manifest, _, deserialized = setup
    monkeypatch.setattr(trt_backend, "gpu_info", lambda: GpuInfo("Other GPU", "9.0", 13000))
    with pytest.raises(ArtifactError, match="built for compute capability 8.9, this Other GPU has 9.0") as info:
        open_engine(manifest, "unet", "tensorrt")
    assert "rebuild with `sdrt build-engines --backend tensorrt`" in str(info.value) and deserialized == []
