"""Random normals equal to ``torch.randn`` on torch's CUDA generator, with numpy only (no GPU needed).

torch's CUDA generator (ATen ``CUDAGeneratorImpl``) is cuRAND's Philox4x32-10 keyed by the 64-bit seed,
plus a per-generator offset that starts at 0 (``manual_seed``). ``randn`` is ATen's ``normal_kernel``
(native/cuda/DistributionTemplates.h): ``distribution_nullary_kernel`` with ``curand_normal4``:

* Launch (``calc_execution_policy``): blocks of 256 threads, ``grid = min(ceil(n / 256),
  SMs * (maxThreadsPerMultiProcessor // 256))``, so ``T = 256 * grid`` threads. The generator's offset
  then advances by ``4 * ceil(n / (4 * T))`` (``CUDAGeneratorState::increase``).
* Thread ``t``: ``curand_init(seed, subsequence=t, offset=O)``, i.e. Philox counter ``(O/4, t)`` as
  two 64-bit halves, key ``(seed lo32, seed hi32)``. Its round ``k`` of the grid-stride loop
  (``distribution_elementwise_grid_stride_kernel``) takes ``curand4`` at counter ``O/4 + k`` and writes
  lane ``l`` of ``curand_normal4`` to element ``k * 4T + l * T + t`` (unroll 4; elements >= n dropped).
* ``curand_normal4`` (curand_normal.h, ``_curand_box_muller`` on words (0,1) and (2,3)):
  ``u = float(x) * 2**-32 + 2**-33``, ``v = fma(float(y), C, C/2)`` with ``C = 2**-32 * 6.2831855f``,
  lanes ``(s sin v, s cos v)`` with ``s = sqrtf(-2 logf(u))``; then ``* std + mean`` (1, 0).

So a tensor of n <= T_max = 256 * SMs * (threads_per_SM // 256) elements takes lane 0 of counter
``(O/4, i)`` for element i on every GPU whose T_max >= n; larger ones depend on the SM count.
Integers and the float32 mapping of u and v are exact here; the device's ``__sincosf`` and ``logf`` are
approximations, computed here correctly rounded, so values agree to ~1e-6, not bit for bit.
float16 is the float32 result rounded (as torch does); float64 (``curand_normal2_double``) is not
reproduced, nor draws over 2 GiB (which torch launches in 32-bit-indexable pieces).
"""

import logging
import operator
from dataclasses import dataclass

import numpy as np

from sdrt.errors import InputError
from sdrt.rng import TorchGenerator, _fma, check_draw, check_seed

log = logging.getLogger(__name__)

_F32, _U64 = np.float32, np.uint64
_M0, _M1 = _U64(0xD2511F53), _U64(0xCD9E8D57)  # PHILOX_M4x32_0/1
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # PHILOX_W32_0/1 (Weyl key increments)
_LO = _U64(0xFFFFFFFF)
_BLOCK = 256  # DistributionTemplates.h block_size_bound
_INV32 = _F32(2.0**-32)  # CURAND_2POW32_INV (2.3283064e-10f rounds to 2**-32 exactly)
_INV32_2PI = _F32(_F32(2.0**-32) * _F32(6.2831855))  # CURAND_2POW32_INV_2PI, folded in float
_CHUNK = 1 << 18  # counters per vectorized pass

# (multiProcessorCount, maxThreadsPerMultiProcessor); threads per SM by compute capability
# (CUDA C Programming Guide): 7.5 -> 1024, 8.6/8.9/12.0 -> 1536, 7.0/8.0/9.0/10.0 -> 2048.
GPU_PRESETS = {
    "h100": (132, 2048), "h100-pcie": (114, 2048), "h200": (132, 2048), "b200": (148, 2048),
    "a100": (108, 2048), "v100": (80, 2048), "t4": (40, 1024), "l4": (58, 1536),
    "l40s": (142, 1536), "l40": (142, 1536), "a10": (72, 1536), "a10g": (80, 1536),
    "a6000": (84, 1536), "5090": (170, 1536), "4090": (128, 1536), "4080": (76, 1536),
    "3090": (82, 1536), "3080": (68, 1536), "2080ti": (68, 1024),
}
DEFAULT_GPU = "h100"


def philox4x32_10(ctr, key):
    """Philox4x32-10 (Salmon et al., SC'11; cuRAND ``curand_Philox4x32_10``) on counters ``ctr`` of shape
    (4, ...) (uint32 words x, y, z, w) with key ``(k0, k1)``; returns uint32 words of the same shape."""
    c0, c1, c2, c3 = (np.asarray(w, _U64) for w in ctr)
    k0, k1 = (int(k) & 0xFFFFFFFF for k in key)
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2  # exact: both factors < 2**32
        c0, c1, c2, c3 = (p1 >> _U64(32)) ^ c1 ^ _U64(k0), p1 & _LO, (p0 >> _U64(32)) ^ c3 ^ _U64(k1), p0 & _LO
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def uniforms(x, y):
    """``_curand_box_muller``'s float32 inputs: u in (0, 1] and the angle v in (0, 6.2831855f], exact as the
    device rounds them (v is one fused multiply-add)."""
    u = np.asarray(x, np.uint32).astype(_F32) * _INV32 + _F32(2.0**-33)
    v = _fma(np.asarray(y, np.uint32).astype(_F32), _INV32_2PI, _F32(_INV32_2PI / _F32(2)))
    return u, v


def box_muller(x, y, lanes=(True, True)):
    """``_curand_box_muller(x, y)`` -> (s sin v, s cos v) in float32; either lane can be skipped (None).
    logf/sqrtf/__sincosf are taken correctly rounded (the device's logf and __sincosf are not)."""
    u, v = uniforms(x, y)
    s = np.sqrt(_F32(-2) * np.log(u.astype(np.float64)).astype(_F32))
    v64 = v.astype(np.float64)
    return tuple(s * f(v64).astype(_F32) + _F32(0) if want else None  # "+ 0" like fma(n, 1, 0): -0 -> +0
                 for f, want in ((np.sin, lanes[0]), (np.cos, lanes[1])))


class CudaGenerator:
    """Reproduces torch's CUDA generator: ``CudaGenerator(s, sm_count=N).randn(shape)`` equals
    ``torch.randn(shape, generator=torch.Generator("cuda").manual_seed(s), device="cuda")`` on a GPU with
    N multiprocessors (to ~1e-6; see the module docstring), and consecutive ``randn`` calls follow
    consecutive torch calls on one generator. Defaults: an H100/H200 (132 SMs x 2048 threads)."""

    def __init__(self, seed: int, sm_count: int = GPU_PRESETS[DEFAULT_GPU][0],
                 max_threads_per_sm: int = GPU_PRESETS[DEFAULT_GPU][1]):
        for name, value, low in (("sm_count", sm_count, 1), ("max_threads_per_sm", max_threads_per_sm, _BLOCK)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= 2**16:
                raise InputError(f"{name} must be an integer in [{low}, 65536], got {value!r}")
        self.sm_count, self.max_threads_per_sm = int(sm_count), int(max_threads_per_sm)
        self.manual_seed(seed)

    @classmethod
    def for_gpu(cls, seed: int, gpu: str) -> "CudaGenerator":
        """The generator of a named GPU (``GPU_PRESETS``, e.g. "h100", "4090", "t4") or ``"sm=N"``."""
        return parse_rng(f"cuda:{gpu}")(seed)

    @property
    def max_threads(self) -> int:
        """T_max: threads of the largest grid; draws of n <= T_max elements are the same on any GPU
        with at least this many."""
        return _BLOCK * self.sm_count * (self.max_threads_per_sm // _BLOCK)

    def manual_seed(self, seed) -> "CudaGenerator":
        """Reseed like ``torch.Generator("cuda").manual_seed``: any int in [-2**63, 2**64) (negatives
        modulo 2**64; all 64 bits are the Philox key); the offset goes back to 0."""
        self._seed = check_seed(seed)
        self._offset = 0
        log.debug("CudaGenerator seeded with %d (%d SMs x %d threads)", self._seed, self.sm_count,
                  self.max_threads_per_sm)
        return self

    @property
    def seed(self) -> int:
        """The seed as ``torch.Generator.initial_seed()`` reports it (in [0, 2**64))."""
        return self._seed

    @property
    def offset(self) -> int:
        """The Philox offset, as ``torch.Generator("cuda").get_offset()`` reports it."""
        return self._offset

    def set_offset(self, offset: int) -> "CudaGenerator":
        """As ``torch.Generator.set_offset``: a multiple of 4."""
        offset = operator.index(offset)
        if offset < 0 or offset % 4 or offset >= 2**64:
            raise InputError(f"offset must be a non-negative multiple of 4 below 2**64, got {offset}")
        self._offset = offset
        return self

    def randn(self, shape, dtype=np.float32) -> np.ndarray:
        """Standard normals of ``shape``, as ``torch.randn(shape, dtype=dtype, generator=..., device="cuda")``.
        dtype: float32 or float16."""
        shape, dtype, n = check_draw(shape, dtype)
        if (n - 1) * dtype.itemsize >= 2**31 - 1:
            raise InputError(f"draws over 2 GiB ({n} elements) are launched in pieces by torch; not reproduced")
        if n == 0:  # torch returns before touching the generator
            return np.empty(shape, dtype)
        threads = _BLOCK * min(-(-n // _BLOCK), self.sm_count * (self.max_threads_per_sm // _BLOCK))
        rounds = (n - 1) // (4 * threads) + 1
        out = self._normals(n, threads, rounds)
        self._offset += 4 * rounds
        return out.astype(dtype, copy=False).reshape(shape)

    def _normals(self, n, threads, rounds):
        """Elements 0..n-1 of the grid-stride layout: round k, lane l, thread t -> k*4T + l*T + t."""
        out = np.empty(rounds * 4 * threads, _F32)
        view = out.reshape(rounds, 4, threads)
        per_pass = max(1, _CHUNK // threads)
        for k0 in range(0, rounds - 1, per_pass):  # full rounds: every lane of every thread
            k1 = min(rounds - 1, k0 + per_pass)
            words = self._words(k0, k1, threads)
            for lane in (0, 2):
                view[k0:k1, lane], view[k0:k1, lane + 1] = box_muller(words[lane], words[lane + 1])
        left = n - (rounds - 1) * 4 * threads  # the last round: lane l writes threads t < left - l*T
        counts = [min(threads, max(0, left - lane * threads)) for lane in range(4)]
        words = self._words(rounds - 1, rounds, threads, counts[0])
        for lane in (0, 2):
            if counts[lane]:
                c = counts[lane]
                a, b = box_muller(words[lane, :, :c], words[lane + 1, :, :c], (True, counts[lane + 1] > 0))
                view[-1:, lane, :c] = a
                if b is not None:
                    view[-1:, lane + 1, :counts[lane + 1]] = b[:, :counts[lane + 1]]
        return out[:n]

    def _words(self, k0, k1, threads, need=None):
        """``curand4`` of rounds k0..k1-1 for threads 0..need-1: Philox at counter (O/4 + k, t), each a
        pair of 64-bit halves (x, y) and (z, w), key (seed lo32, seed hi32). Shape (4, k1-k0, need)."""
        kk = (_U64(self._offset // 4) + np.arange(k0, k1, dtype=_U64))[:, None]
        tid = np.arange(threads if need is None else need, dtype=_U64)[None, :]
        ctr = np.broadcast_arrays(kk & _LO, kk >> _U64(32), tid & _LO, tid >> _U64(32))
        return philox4x32_10(ctr, (self._seed & 0xFFFFFFFF, self._seed >> 32))


@dataclass(frozen=True)
class RngSpec:
    """A parsed ``--rng`` value; call it with a seed for a generator (``TorchGenerator`` or
    ``CudaGenerator``). ``name`` is the canonical spelling, ``infotext`` A1111's ``RNG:`` value."""

    kind: str  # "cpu" or "cuda"
    gpu: str | None = None
    sm_count: int | None = None
    max_threads_per_sm: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        if self.gpu:
            return f"cuda:{self.gpu}"
        suffix = "" if self.max_threads_per_sm == 2048 else f",threads={self.max_threads_per_sm}"
        return f"cuda:sm={self.sm_count}{suffix}"

    @property
    def infotext(self) -> str:
        return "CPU" if self.kind == "cpu" else "NV"

    def __call__(self, seed: int):
        if self.kind == "cpu":
            return TorchGenerator(seed)
        return CudaGenerator(seed, self.sm_count, self.max_threads_per_sm)


def parse_rng(spec: str | None = "cpu") -> RngSpec:
    """``cpu`` (default; torch's CPU generator), ``cuda`` (= ``cuda:h100``), ``cuda:GPU`` with GPU a
    ``GPU_PRESETS`` name (``h100``, ``a100``, ``4090``, ``t4``, ...; ``rtx``/``nvidia-`` prefixes are
    ignored) or ``cuda:sm=N[,threads=M]`` (M = maxThreadsPerMultiProcessor, default 2048)."""
    text = "cpu" if spec is None else str(spec).strip().lower()
    if text == "cpu":
        return RngSpec("cpu")
    kind, _, gpu = text.partition(":")
    if kind != "cuda":
        raise InputError(f"--rng must be cpu, cuda or cuda:GPU (GPU a name or sm=N), got {spec!r}")
    gpu = gpu.strip() or DEFAULT_GPU
    if gpu.startswith("sm="):
        fields = dict(part.partition("=")[::2] for part in gpu.split(","))
        try:
            if set(fields) - {"sm", "threads"}:
                raise ValueError
            sm, threads = int(fields["sm"]), int(fields.get("threads", 2048))
        except ValueError:
            raise InputError(f"--rng cuda:sm=N[,threads=M] takes integers, got {spec!r}") from None
        if not (1 <= sm <= 2**16 and _BLOCK <= threads <= 2**16):
            raise InputError(f"--rng: sm must be in [1, 65536] and threads in [256, 65536], got {spec!r}")
        return RngSpec("cuda", None, sm, threads)
    name = gpu.removeprefix("nvidia-").removeprefix("nvidia").removeprefix("rtx-").removeprefix("rtx")
    name = name.replace(" ", "").replace("_", "-")
    if name not in GPU_PRESETS:
        raise InputError(f"--rng: unknown GPU {gpu!r}; known: {', '.join(sorted(GPU_PRESETS))}, or sm=N")
    return RngSpec("cuda", name, *GPU_PRESETS[name])
