"""``sdrt.rng.TorchGenerator`` against torch's CPU generator, computed here: every comparison is bit for bit
(same dtype, shape and bytes, so even the sign of zero must agree). The reference is torch's default
(AVX2/AVX512) CPU kernel; the scalar ``ATEN_CPU_CAPABILITY=default`` kernel is not reproduced."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from sdrt.errors import InputError
from sdrt.rng import TorchGenerator, _fma, random_seed

SEEDS = [0, 1, 42, 2**32 + 5, 2**63 - 1, 2**64 - 1, -1, -(2**63), 987654321123]
SHAPES = [(), (0,), (1,), (3,), (15,), (16,), (17,), (31,), (33,), (3, 5, 7), (1, 4, 8, 8), (2, 4, 64, 64),
          (1, 4, 96, 64), (1, 4, 97, 65)]


def torch_gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def assert_bits_equal(ours, theirs):
    theirs = theirs.numpy()
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours.reshape(-1).view(np.uint8), theirs.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_single_draw_float32(seed, shape):
    assert_bits_equal(TorchGenerator(seed).randn(shape), torch.randn(shape, generator=torch_gen(seed)))


def test_large_draw():
    shape = (4, 4, 128, 128)
    assert_bits_equal(TorchGenerator(3).randn(shape), torch.randn(shape, generator=torch_gen(3)))


@pytest.mark.parametrize("shape", [(1,), (5,), (16,), (17,), (33,), (2, 4, 17, 9)], ids=str)
def test_single_draw_float16(shape):
    """float16 draws whole rows of 16 uniforms before the tail (not numel of them like float32)."""
    assert_bits_equal(TorchGenerator(9).randn(shape, dtype=np.float16),
                      torch.randn(shape, generator=torch_gen(9), dtype=torch.float16))


def test_many_seeds_and_odd_sizes():
    rng = np.random.default_rng(0)
    for seed in rng.integers(0, 2**63, 150):
        n = int(rng.integers(1, 3000))
        assert_bits_equal(TorchGenerator(int(seed)).randn((n,)), torch.randn((n,), generator=torch_gen(int(seed))))


def test_call_sequences_follow_one_stream():
    """Latents then per-step noise from one generator; the scalar path's cached second Box-Muller sample
    survives vector draws in between and is dropped by manual_seed."""
    calls = [(3,), (3,), (1,), (40,), (1,), (2, 4, 64, 64), (5,), (16,), (1,), (7,), (1, 4, 8, 8), (15,), (17,)]
    ours, theirs = TorchGenerator(7), torch_gen(7)
    for shape in calls:
        assert_bits_equal(ours.randn(shape), torch.randn(shape, generator=theirs))
    for gen in (ours, theirs):
        gen.manual_seed(11)
    for shape in [(1,), (1,), (20,), (1,)]:
        assert_bits_equal(ours.randn(shape), torch.randn(shape, generator=theirs))
    mixed = [((9,), torch.float16), ((18,), torch.float32), ((18,), torch.float16), ((1,), torch.float32)]
    for shape, dtype in mixed:
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        assert_bits_equal(ours.randn(shape, dtype=np_dtype), torch.randn(shape, generator=theirs, dtype=dtype))


def test_seed_semantics_match_torch():
    for seed in [0, 5, -1, -5, 2**63, 2**64 - 1, -(2**63)]:
        assert TorchGenerator(seed).seed == torch_gen(seed).initial_seed()
    assert TorchGenerator(np.int64(42)).seed == 42
    assert np.array_equal(TorchGenerator(5).randn(20), TorchGenerator(5 + 2**32).randn(20))  # low 32 bits only
    gen = TorchGenerator(1)
    assert gen.manual_seed(2) is gen and gen.seed == 2
    assert_bits_equal(gen.randn((4, 4)), torch.randn((4, 4), generator=torch_gen(2)))


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "3", None])
def test_bad_seed_raises(seed):
    with pytest.raises(InputError, match="seed"):
        TorchGenerator(seed)


def test_bad_dtype_and_shape_raise():
    with pytest.raises(InputError, match="float32"):
        TorchGenerator(0).randn((4,), dtype=np.float64)
    with pytest.raises(InputError, match="negative"):
        TorchGenerator(0).randn((2, -1))


def test_random_seed_range():
    seeds = {random_seed() for _ in range(50)}
    assert len(seeds) > 45 and all(0 <= s < 2**32 for s in seeds)


def test_fma_rounds_once():
    """The float64 sum lands exactly on a float32 tie while the exact result lies just off it."""
    f32 = np.float32
    a = np.array([8 + 2**-20, -(8 + 2**-20), 8 + 2**-20], f32)
    b = np.array([8 - 2**-20] * 3, f32)
    c = np.array([2**30 + 128, -(2**30 + 128), 2**30], f32)
    got = _fma(a, b, c)
    for x, y, z, r in zip(a, b, c, got):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        err = [abs(exact - Fraction(float(np.nextafter(r, f32(d))))) for d in (-np.inf, np.inf)]
        assert abs(exact - Fraction(float(r))) < min(err)
    assert got.tolist() == [2**30 + 128, -(2**30 + 128), 2**30]


def test_no_torch_import():
    code = "import sys, sdrt.rng; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
