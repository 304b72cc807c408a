"""TensorRT / TensorRT-RTX backend: ``engine(feeds) -> dict`` like the ONNX Runtime one.

``open_tensorrt`` checks, in this order and before any engine byte reaches TensorRT: the manifest record
(it exists and was built from this artifact's ONNX), the engine file's sha256, the installed flavour
and version, then the GPU (the recorded compute capability for TensorRT; the recorded targets and
TensorRT-RTX's own header check for RTX). Only then is the engine deserialized, once.

Each engine gets one execution context whose activation memory is a device buffer shared by every
engine of the process (they run one at a time on one stream), sized to the largest any of them needs.
Input and output buffers are allocated once, for the profile's largest shapes, and bound once;
``set_input_shape`` runs only when shapes change. With ``cuda_graph`` a TensorRT engine records one
CUDA graph per input shape and replays it (TensorRT-RTX captures whole graphs itself). Feeds may be
numpy or cupy arrays; outputs are cupy arrays when any feed was one, numpy otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from sdrt.backends import refit
from sdrt.backends.cuda import Cuda, CudaError, gpu_info
from sdrt.errors import ArtifactError, InputError
from sdrt.manifest import Manifest
from sdrt.specs import ComponentSpec

log = logging.getLogger(__name__)

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PACKAGES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx"}

_CUDA: Cuda | None = None


def _cuda() -> Cuda:
    """One CUDA context and stream for every engine of the process."""
    global _CUDA
    if _CUDA is None:
        _CUDA = Cuda()
    return _CUDA


class _Activations:
    """Activation memory shared by all engines; grows (and bumps ``generation``) when one needs more."""

    def __init__(self):
        self.ptr, self.size, self.generation = 0, 0, 0

    def reserve(self, cuda: Cuda, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        cuda.synchronize()
        if self.ptr:
            cuda.free(self.ptr)
            self.ptr, self.size = 0, 0
        self.ptr, self.size = cuda.alloc(nbytes), nbytes
        self.generation += 1


_ACTIVATIONS = _Activations()


def import_flavour(backend: str):
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError:
        raise InputError(f"backend {backend} needs the {MODULES[backend]} package: pip install "
                         f"{PACKAGES[backend]}") from None


def _deserialize(runtime, data: bytes):
    """``deserialize_cuda_engine`` (module level so tests can check it is not reached)."""
    return runtime.deserialize_cuda_engine(data)


def open_tensorrt(manifest: Manifest, component: str, backend: str, cuda_graph: bool = False) -> "TensorRTEngine":
    """Check one engine against the manifest, TensorRT and the GPU, then deserialize it."""
    path, record = manifest.verified_engine(backend, component)
    fix = f"rebuild with `{manifest.rebuild_command(backend)}`"
    trt = import_flavour(backend)
    built = f"{record.get('flavour')} {record.get('version')}"
    if record.get("flavour") != trt.__name__ or record.get("version") != trt.__version__:
        raise ArtifactError(f"{path} was built with {built}, this is {trt.__name__} {trt.__version__}; {fix}")
    try:
        gpu = gpu_info()
    except CudaError as exc:
        raise InputError(f"backend {backend} needs an NVIDIA GPU with CUDA and there is none ({exc}); "
                         "use the ort-cpu backend") from None
    sm = "SM" + gpu.compute_capability.replace(".", "")
    if backend == "tensorrt" and record.get("compute_capability") != gpu.compute_capability:
        raise ArtifactError(f"{path} was built for compute capability {record.get('compute_capability')}, this "
                            f"{gpu.name} has {gpu.compute_capability}; {fix}")
    targets = record.get("targets")
    if backend == "tensorrt-rtx" and isinstance(targets, list) and sm not in targets:
        raise ArtifactError(f"{path} was built for {', '.join(targets).lower()}, this {gpu.name} is "
                            f"{sm.lower()}; {fix}")
    cache = manifest.root / record["runtime_cache"] if record.get("runtime_cache") else None
    engine = TensorRTEngine(trt, path, manifest.specs[component], fix, cuda_graph=cuda_graph, runtime_cache=cache)
    engine.refit_plan = refit.load_plan(manifest, backend, component, record)
    return engine


class TensorRTEngine:
    """One deserialized engine with its context, I/O buffers and (optionally) CUDA graphs."""

    def __init__(self, trt, path: Path, spec: ComponentSpec, fix: str, cuda_graph: bool = False,
                 runtime_cache: Path | None = None):
        self.trt, self.spec, self.path = trt, spec, path
        self.rtx = trt.__name__ == "tensorrt_rtx"
        self.cuda = _cuda()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = path.read_bytes()
        if hasattr(self._runtime, "get_engine_validity"):
            validity, diagnostics = self._runtime.get_engine_validity(data[:self._runtime.engine_header_size])
            if validity == trt.EngineValidity.INVALID:
                reasons = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if diagnostics & int(v)]
                raise ArtifactError(f"{trt.__name__} cannot run {path} on this GPU "
                                    f"({', '.join(reasons) or 'no reason given'}); {fix}")
        self.engine = _deserialize(self._runtime, data)
        del data
        if self.engine is None:
            raise ArtifactError(f"{trt.__name__} could not deserialize {path}; {fix}")
        self._cache_path, self._cache = runtime_cache, None
        self.context = self._make_context(cuda_graph)
        self.cuda_graph = cuda_graph and not self.rtx
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        missing = set(spec.input_names + spec.output_names) - set(names)
        if missing:
            raise ArtifactError(f"{path} lacks tensors {sorted(missing)} that the {spec.name} spec names; {fix}")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.limits = {n: [tuple(d) for d in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}
        self.buffers: dict[str, int] = {}
        self._allocate()
        memory = getattr(self.engine, "device_memory_size_v2", None)
        _ACTIVATIONS.reserve(self.cuda, memory if memory is not None else self.engine.device_memory_size)
        self._generation = -1
        self._shape_key: tuple | None = None
        self._out_shapes: dict[tuple, dict] = {}
        self._graphs: dict[tuple, int] = {}
        self._seen: set[tuple] = set()

    def _make_context(self, cuda_graph: bool):
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if not self.rtx:
            return self.engine.create_execution_context(strategy)
        config = self.engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        if cuda_graph:
            config.cuda_graph_strategy = self.trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self._cache = config.create_runtime_cache()
        if self._cache_path and self._cache_path.is_file() and not self._cache.deserialize(
                self._cache_path.read_bytes()):
            log.info("%s does not match this GPU, driver or TensorRT-RTX; starting a new one", self._cache_path)
        config.set_runtime_cache(self._cache)
        return self.engine.create_execution_context(config)

    def _allocate(self) -> None:
        """I/O buffers for the profile's largest shapes, bound once."""
        for name in self.inputs:
            self._set_shape(name, self.limits[name][2])
        for name in self.inputs + self.outputs:
            shape = self.limits[name][2] if name in self.inputs else tuple(self.context.get_tensor_shape(name))
            self.buffers[name] = self.cuda.alloc(int(np.prod(shape)) * self.dtypes[name].itemsize)
            if not self.context.set_tensor_address(name, self.buffers[name]):
                raise ArtifactError(f"TensorRT refused the buffer of {name} in {self.path}")

    def _set_shape(self, name: str, shape: tuple) -> None:
        if not self.context.set_input_shape(name, shape):
            raise InputError(f"{self.spec.name}: TensorRT refused shape {shape} for {name}")

    def _bind(self, key: tuple, shapes: dict) -> None:
        """Input shapes and activation memory for this call (work only when they changed)."""
        if key != self._shape_key:
            for name, shape in shapes.items():
                self._set_shape(name, shape)
            self._shape_key = key
            self._out_shapes.setdefault(key, {n: tuple(self.context.get_tensor_shape(n)) for n in self.outputs})
            if hasattr(self.context, "update_device_memory_size_for_shapes"):
                _ACTIVATIONS.reserve(self.cuda, self.context.update_device_memory_size_for_shapes())
        if self._generation != _ACTIVATIONS.generation:
            if hasattr(self.context, "set_device_memory"):
                self.context.set_device_memory(_ACTIVATIONS.ptr, _ACTIVATIONS.size)
            else:
                self.context.device_memory = _ACTIVATIONS.ptr
            self._generation = _ACTIVATIONS.generation
            self._drop_graphs()

    def _check(self, name: str, shape: tuple) -> None:
        lo, _, hi = self.limits[name]
        if len(shape) != len(hi) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            raise InputError(f"{self.spec.name}: {name} has shape {shape}, this engine serves {lo}..{hi} "
                             "(rebuild with other --min-size/--max-size/--max-batch/--static)")

    def __call__(self, feeds: dict) -> dict:
        cupy, arrays = None, {}
        for name in self.inputs:
            if name not in feeds:
                raise InputError(f"{self.spec.name}: missing input {name!r}")
            value = feeds[name]
            if hasattr(value, "__cuda_array_interface__"):
                import cupy

                value = cupy.ascontiguousarray(value, dtype=self.dtypes[name])
            else:
                value = np.ascontiguousarray(value, dtype=self.dtypes[name])
            self._check(name, tuple(value.shape))
            arrays[name] = value
        shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        key = tuple(shapes.values())
        self._bind(key, shapes)
        if cupy is not None:
            cupy.cuda.get_current_stream().synchronize()  # the feeds' producer has finished
        for name, value in arrays.items():
            if hasattr(value, "__cuda_array_interface__"):
                self.cuda.copy(self.buffers[name], value.data.ptr, value.nbytes)
            else:
                self.cuda.to_device(self.buffers[name], value.ctypes.data, value.nbytes)
        self._run(key)
        outputs = {}
        for name in self.spec.output_names:
            shape, dtype = self._out_shapes[key][name], self.dtypes[name]
            if cupy is not None:
                outputs[name] = cupy.empty(shape, dtype)
                self.cuda.copy(outputs[name].data.ptr, self.buffers[name], outputs[name].nbytes)
            else:
                outputs[name] = np.empty(shape, dtype)
                self.cuda.to_host(outputs[name].ctypes.data, self.buffers[name], outputs[name].nbytes)
        self.cuda.synchronize()
        return outputs

    def _run(self, key: tuple) -> None:
        if key in self._graphs:
            self.cuda.launch(self._graphs[key])
            return
        self._execute()  # eager first: it also settles TensorRT's state for a new shape before any capture
        if self.cuda_graph:
            try:
                self._graphs[key] = self.cuda.capture(self._execute)
            except CudaError as exc:
                log.warning("%s: CUDA graph capture failed (%s); running eagerly", self.spec.name, exc)
                self.cuda_graph = False
        if self.rtx and self._cache_path is not None and key not in self._seen:
            self._save_runtime_cache()
        self._seen.add(key)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream):
            raise ArtifactError(f"{self.spec.name}: TensorRT could not run {self.path}")

    def _save_runtime_cache(self) -> None:
        """Keep what TensorRT-RTX compiled for this GPU so the next process skips compiling it."""
        path = self._cache_path
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(memoryview(self._cache.serialize()))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot save the TensorRT-RTX runtime cache %s (%s)", path, exc.strerror or exc)
            self._cache_path = None

    def refit(self, changed: dict) -> list[str]:
        """Run-time LoRA: these ONNX initializers take these full arrays, every other refittable weight its
        base (``refit.py``; an engine not built with ``--refit`` is refused with the command that rebuilds it)."""
        return refit.refit(self, changed)

    def _drop_graphs(self) -> None:
        for graph in self._graphs.values():
            self.cuda.destroy_graph(graph)
        self._graphs.clear()

    def close(self) -> None:
        """Free this engine's graphs and I/O buffers (the shared activation memory stays)."""
        if getattr(self, "buffers", None):
            self.cuda.synchronize()
            self._drop_graphs()
            for ptr in self.buffers.values():
                self.cuda.free(ptr)
            self.buffers = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may already be gone
            pass
