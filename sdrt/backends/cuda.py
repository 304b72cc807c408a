"""The CUDA driver API through ctypes: which GPU is here, and the few calls the TensorRT backend makes
(device memory, copies, one stream, graph capture). No package needed beyond the NVIDIA driver, so the
engine builder and the trust checks can ask for the GPU's compute capability without torch or cupy."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

from sdrt.errors import SdrtError

_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_*
_STREAM_NON_BLOCKING = 1
_CAPTURE_THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL


class CudaError(SdrtError):
    """A CUDA driver call failed (no driver, no device, out of memory, ...)."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.9"
    driver_version: int


def _load_driver() -> ctypes.CDLL:
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise CudaError(f"no NVIDIA driver ({name} not found)") from None
    u64, vp, size, i32 = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    signatures = {
        "cuInit": [ctypes.c_uint], "cuDriverGetVersion": [ctypes.POINTER(i32)],
        "cuDeviceGetCount": [ctypes.POINTER(i32)], "cuDeviceGet": [ctypes.POINTER(i32), i32],
        "cuDeviceGetAttribute": [ctypes.POINTER(i32), i32, i32], "cuDeviceGetName": [ctypes.c_char_p, i32, i32],
        "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), i32], "cuCtxSetCurrent": [vp],
        "cuCtxGetCurrent": [ctypes.POINTER(vp)],
        "cuMemAlloc_v2": [ctypes.POINTER(u64), size], "cuMemFree_v2": [u64],
        "cuMemcpyHtoDAsync_v2": [u64, vp, size, vp], "cuMemcpyDtoHAsync_v2": [vp, u64, size, vp],
        "cuMemcpyDtoDAsync_v2": [u64, u64, size, vp],
        "cuStreamCreate": [ctypes.POINTER(vp), ctypes.c_uint], "cuStreamSynchronize": [vp],
        "cuStreamBeginCapture_v2": [vp, i32], "cuStreamEndCapture": [vp, ctypes.POINTER(vp)],
        "cuGraphInstantiateWithFlags": [ctypes.POINTER(vp), vp, ctypes.c_ulonglong],
        "cuGraphLaunch": [vp, vp], "cuGraphExecDestroy": [vp], "cuGraphDestroy": [vp],
        "cuGetErrorString": [i32, ctypes.POINTER(ctypes.c_char_p)],
    }
    for fname, argtypes in signatures.items():
        fn = getattr(lib, fname)
        fn.argtypes, fn.restype = argtypes, i32
    return lib


_DRIVER: ctypes.CDLL | None = None


def driver() -> ctypes.CDLL:
    """The initialized driver library (``CudaError`` when there is none or no device)."""
    global _DRIVER
    if _DRIVER is None:
        lib = _load_driver()
        _check(lib, lib.cuInit(0), "cuInit")
        count = ctypes.c_int(0)
        _check(lib, lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value < 1:
            raise CudaError("the NVIDIA driver sees no GPU")
        _DRIVER = lib
    return _DRIVER


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(code, ctypes.byref(text))
        raise CudaError(f"{what} failed: CUDA error {code} ({(text.value or b'?').decode()})")


def gpu_info(device: int = 0) -> GpuInfo:
    """Name, compute capability and driver version of ``device``; ``CudaError`` without a GPU."""
    lib = driver()
    dev, major, minor, version = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
    _check(lib, lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev.value), "cuDeviceGetAttribute")
    _check(lib, lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev.value), "cuDeviceGetAttribute")
    _check(lib, lib.cuDeviceGetName(name, len(name), dev.value), "cuDeviceGetName")
    _check(lib, lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    return GpuInfo(name.value.decode(errors="replace"), f"{major.value}.{minor.value}", version.value)


class Cuda:
    """Device 0's primary context (the one the CUDA runtime, TensorRT and cupy use) and one stream. Every
    call first makes that context current in the calling thread: driver calls act on the thread's current
    context, and a thread that has not used the CUDA runtime has none (``sdrt serve`` opens engines in
    one thread and runs them in others)."""

    def __init__(self, device: int = 0):
        self.lib = lib = driver()
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        _check(lib, lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain")
        self.context = ctx.value
        self._bind()
        stream = ctypes.c_void_p()
        _check(lib, lib.cuStreamCreate(ctypes.byref(stream), _STREAM_NON_BLOCKING), "cuStreamCreate")
        self.stream = stream.value or 0
        self._cupy_blocks: dict[int, object] = {}

    def _bind(self) -> None:
        current = ctypes.c_void_p()
        _check(self.lib, self.lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        if current.value != self.context:
            _check(self.lib, self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        """Device memory (256-byte aligned); from cupy's pool when cupy is installed."""
        nbytes = max(int(nbytes), 256)
        self._bind()
        try:
            import cupy
        except ImportError:
            ptr = ctypes.c_uint64()
            _check(self.lib, self.lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), f"allocating {nbytes} bytes")
            return ptr.value
        block = cupy.cuda.alloc(nbytes)
        self._cupy_blocks[block.ptr] = block
        return block.ptr

    def free(self, ptr: int) -> None:
        self._bind()
        if self._cupy_blocks.pop(ptr, None) is None and ptr:
            _check(self.lib, self.lib.cuMemFree_v2(ptr), "cuMemFree")

    def to_device(self, dst: int, host_ptr: int, nbytes: int) -> None:
        self._bind()
        _check(self.lib, self.lib.cuMemcpyHtoDAsync_v2(dst, host_ptr, nbytes, self.stream), "host-to-device copy")

    def to_host(self, host_ptr: int, src: int, nbytes: int) -> None:
        self._bind()
        _check(self.lib, self.lib.cuMemcpyDtoHAsync_v2(host_ptr, src, nbytes, self.stream), "device-to-host copy")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._bind()
        _check(self.lib, self.lib.cuMemcpyDtoDAsync_v2(dst, src, nbytes, self.stream), "device-to-device copy")

    def synchronize(self) -> None:
        self._bind()
        _check(self.lib, self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def capture(self, work) -> int:
        """Record what ``work()`` enqueues on the stream as an executable CUDA graph (nothing runs)."""
        self._bind()
        _check(self.lib, self.lib.cuStreamBeginCapture_v2(self.stream, _CAPTURE_THREAD_LOCAL), "begin capture")
        graph = ctypes.c_void_p()
        try:
            work()
        finally:
            code = self.lib.cuStreamEndCapture(self.stream, ctypes.byref(graph))
        _check(self.lib, code, "end capture")
        executable = ctypes.c_void_p()
        try:
            _check(self.lib, self.lib.cuGraphInstantiateWithFlags(ctypes.byref(executable), graph, 0),
                   "cuGraphInstantiate")
        finally:
            self.lib.cuGraphDestroy(graph)
        return executable.value

    def launch(self, graph_exec: int) -> None:
        self._bind()
        _check(self.lib, self.lib.cuGraphLaunch(graph_exec, self.stream), "cuGraphLaunch")

    def destroy_graph(self, graph_exec: int) -> None:
        self._bind()
        self.lib.cuGraphExecDestroy(graph_exec)
