"""Random normals bit-identical to ``torch.randn`` on torch's CPU generator, with numpy only.

torch's CPU generator (ATen ``CPUGeneratorImpl``) is a std::mt19937 seeded with ``init_genrand(seed &
0xffffffff)``; numpy's ``MT19937`` with legacy seeding yields the same 32-bit stream. ``randn`` follows
ATen's ``normal_kernel`` (native/cpu/DistributionTemplates.h):

* numel >= 16 (``normal_fill``): one uniform ``(r32 & 0xffffff) * 2**-24`` per element, then Box-Muller
  on rows of 16 (``u1 = 1 - u[0:8]``, ``u2 = u[8:16]``; cos into the first 8, sin into the last 8); when
  numel % 16 != 0, 16 fresh uniforms recompute the last 16 outputs. Float16 draws only whole rows
  before the tail. The math is the AVX2 kernel ``NormalFill16<float>`` with ``log256_ps`` and
  ``sincos256_ps`` (avx_mathfun.h, Cephes polynomials) exactly as GCC compiled it into libtorch_cpu:
  float32 operations, with the multiply-adds it contracted into FMAs emulated exactly below.
  Builds whose CPU capability is AVX2 or AVX512 (every x86-64 wheel) run this kernel; the scalar
  fallback (``ATEN_CPU_CAPABILITY=default``, non-x86 builds) uses libm's logf/cosf/sinf and is not
  reproduced.
* numel < 16: ``normal_distribution<double>`` per element: 53-bit uniforms from two 32-bit draws,
  Box-Muller in double (libm, as Python's ``math``), the sin half cached in the generator for the next
  scalar sample (the cache survives other draws; ``manual_seed`` clears it), cast to the dtype.
"""

import logging
import math
import operator
import secrets

import numpy as np

from sdrt.errors import InputError

log = logging.getLogger(__name__)

_F32, _F64 = np.float32, np.float64
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_BLOCK = 4096  # rows of 16 per Box-Muller pass, so temporaries stay in cache


def _fma(a, b, c):
    """float32 ``a * b + c`` rounded once. a*b is exact in float64; the float64 sum is then rounded to
    float32, which is wrong only if it landed exactly on a float32 tie while inexact: elements on a tie
    get their exact error (TwoSum) and are nudged one float64 ulp toward it before the final rounding."""
    s = np.multiply(a, b, dtype=_F64)
    s += c
    bits = s.view(np.int64)
    tie = (bits & 0x1FFFFFFF) == 0x10000000
    if tie.any():
        tie = np.flatnonzero(tie)
        a, b, c = (np.broadcast_to(v, s.shape).ravel()[tie].astype(_F64) for v in (a, b, c))
        flat = bits.reshape(-1)
        s_t = flat[tie].view(_F64)
        c_in_s = s_t - a * b
        err = (a * b - (s_t - c_in_s)) + (c - c_in_s)
        flat[tie] += np.where(err == 0, 0, np.where((err > 0) == (s_t > 0), 1, -1))
    return s.astype(_F32)


def _log(x):
    """``log256_ps`` for x in [2**-24, 1]."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7E).astype(_F32)
    x = ((bits & 0x007FFFFF) | 0x3F000000).view(_F32)
    small = x < _F32(0.707106781186547524)
    e -= small
    x = (x - _F32(1)) + np.where(small, x, _F32(0))
    z = x * x
    y = _fma(_F32(_LOG_P[0]), x, _F32(_LOG_P[1]))
    for p in _LOG_P[2:]:
        y = _fma(y, x, _F32(p))
    y = _fma(y * x, z, e * _F32(-2.12194440e-4))
    y = _fma(-z, _F32(0.5), y)
    return _fma(e, _F32(0.693359375), x + y)


def _sincos(x):
    """``sincos256_ps`` for x >= 0."""
    j = (x * _F32(1.27323954473516)).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(_F32)
    flip_sin = (j & 4) != 0
    flip_cos = (~(j - 2) & 4) != 0
    use_sin_poly = (j & 2) == 0
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma(y, _F32(dp), x)
    z = x * x
    yc = _fma(_F32(2.443315711809948e-5), z, _F32(-1.388731625493765e-3))
    yc = _fma(yc, z, _F32(4.166664568298827e-2))
    yc = _fma(z, yc * z, -(z * _F32(0.5))) + _F32(1)
    ys = _fma(_F32(-1.9515295891e-4), z, _F32(8.3321608736e-3))
    ys = _fma(ys, z, _F32(-1.6666654611e-1))
    ys = _fma(x, ys * z, x)
    sin = np.where(use_sin_poly, ys, yc)
    cos = np.where(use_sin_poly, yc, ys)
    return np.where(flip_sin, -sin, sin), np.where(flip_cos, -cos, cos)


def _box_muller(u):
    """``NormalFill16<float>`` (AVX2) on uniforms of shape (rows, 16), in place."""
    for i in range(0, len(u), _BLOCK):
        blk = u[i:i + _BLOCK]
        radius = np.sqrt(_log(_F32(1) - blk[:, :8]) * _F32(-2))
        sin, cos = _sincos(_F32(2.0 * math.pi) * blk[:, 8:])
        blk[:, :8] = radius * cos + _F32(0)  # + 0 like the kernel's fma(n, std=1, mean=0): -0 -> +0
        blk[:, 8:] = radius * sin + _F32(0)
    return u


def check_seed(seed) -> int:
    """A torch seed: any int in [-2**63, 2**64), negatives taken modulo 2**64; else InputError."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise InputError(f"seed must be an integer, got {seed!r}") from None
    if not -2**63 <= seed < 2**64:
        raise InputError(f"seed must be in [-2**63, 2**64 - 1] (as torch accepts), got {seed}")
    return seed % 2**64


def check_draw(shape, dtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as a tuple, dtype, element count) of a ``randn`` request, or InputError (every generator)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise InputError(f"randn supports float32 and float16, not {dtype}")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if any(operator.index(d) < 0 for d in shape):
        raise InputError(f"randn shape must not have negative sizes, got {shape}")
    return shape, dtype, math.prod(shape)


class TorchGenerator:
    """Reproduces torch's CPU generator (mt19937): ``TorchGenerator(s).randn(shape)`` equals
    ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))`` bit for bit, and
    consecutive ``randn`` calls follow consecutive torch calls on one generator."""

    def __init__(self, seed: int):
        self.manual_seed(seed)

    def manual_seed(self, seed) -> "TorchGenerator":
        """Reseed like ``torch.Generator.manual_seed``: any int in [-2**63, 2**64), negatives taken
        modulo 2**64; only the low 32 bits reach mt19937 (seeds equal mod 2**32 give equal noise)."""
        self._seed = check_seed(seed)
        self._mt = np.random.MT19937()
        self._mt.state = np.random.RandomState(self._seed & 0xFFFFFFFF).get_state(legacy=False)
        self._cached_normal = None
        log.debug("TorchGenerator seeded with %d", self._seed)
        return self

    @property
    def seed(self) -> int:
        """The seed as ``torch.Generator.initial_seed()`` reports it (in [0, 2**64))."""
        return self._seed

    def randn(self, shape, dtype=np.float32) -> np.ndarray:
        """Standard normals of ``shape``, as ``torch.randn(shape, dtype=dtype, generator=...)``.
        dtype: float32 or float16."""
        shape, dtype, n = check_draw(shape, dtype)
        if n < 16:
            out = np.array([self._scalar_normal() for _ in range(n)], _F32)
        else:
            out = self._normal_fill(n, whole_rows_first=dtype == np.float16)
        return out.astype(dtype, copy=False).reshape(shape)

    def _uniforms(self, count):
        raw = self._mt.random_raw(count).astype(np.uint32)
        return (raw & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _normal_fill(self, n, whole_rows_first):
        rows = n // 16
        u = self._uniforms(rows * 16 if whole_rows_first else n)
        out = np.empty(n, _F32)
        out[:rows * 16] = _box_muller(u[:rows * 16].reshape(rows, 16)).ravel()
        if n % 16:
            out[-16:] = _box_muller(self._uniforms(16).reshape(1, 16)).ravel()
        return out

    def _scalar_normal(self):
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        r = [int(v) for v in self._mt.random_raw(4)]
        u1 = (((r[0] << 32) | r[1]) & (2**53 - 1)) * 2.0**-53
        u2 = (((r[2] << 32) | r[3]) & (2**53 - 1)) * 2.0**-53
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)


def random_seed() -> int:
    """A fresh seed for runs without one, in [0, 2**32): torch's own ``seed()`` draws 64 bits, but
    its CPU mt19937 keeps only the low 32, so a wider range would only alias the same noise."""
    return secrets.randbelow(2**32)


class GeneratorList:
    """One ``TorchGenerator`` per image, as diffusers' list of generators (``randn_tensor``): a draw of
    shape (N, ...) is N draws of (1, ...), image k's from generator k, concatenated. So each image's noise
    depends on its own seed only and image k of a batch equals a batch-1 run with seed k."""

    def __init__(self, seeds, factory=None):
        """``factory(seed)`` makes each generator (default ``TorchGenerator``; e.g. an ``RngSpec``)."""
        factory = TorchGenerator if factory is None else factory
        self.generators = [factory(s) for s in seeds]
        if not self.generators:
            raise InputError("a seed list needs at least one seed")

    @property
    def seeds(self) -> list[int]:
        return [g.seed for g in self.generators]

    def randn(self, shape, dtype=np.float32) -> np.ndarray:
        shape = tuple(shape)
        if not shape or shape[0] != len(self.generators):
            raise InputError(f"a draw of shape {shape} does not match {len(self.generators)} per-image seeds")
        return np.concatenate([g.randn((1,) + shape[1:], dtype) for g in self.generators])


_CUDA_NAMES = ("CudaGenerator", "GPU_PRESETS", "RngSpec", "parse_rng")


def __getattr__(name):
    """Re-export of ``sdrt.rng_cuda`` (torch's CUDA generator), loaded on first use: it imports this
    module, so a plain import here would be circular."""
    if name in _CUDA_NAMES:
        from sdrt import rng_cuda

        return getattr(rng_cuda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
