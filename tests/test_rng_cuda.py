"""``sdrt.rng.CudaGenerator`` (torch's CUDA generator in numpy). Without a GPU: Philox against Random123's
known answers, the float32 Box-Muller inputs against exact rationals, the launch layout against a literal
per-thread rendering of torch's kernel, offsets across calls, and values torch users published from real
GPUs. With torch.cuda: many shapes, seeds and call sequences against torch on this GPU."""

from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from sdrt.errors import InputError
from sdrt.rng import CudaGenerator, GPU_PRESETS, TorchGenerator, parse_rng
from sdrt import rng_cuda
from sdrt.rng_cuda import box_muller, philox4x32_10, uniforms

# Random123 (D. E. Shaw Research) tests/kat_vectors, "philox4x32 10" lines: counter words, key words,
# output; the generator of Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11.
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def test_philox_known_answers():
    for ctr, key, want in KAT:
        assert philox4x32_10(np.array(ctr, np.uint32)[:, None], key)[:, 0].tolist() == list(want)
    ctrs = np.array([c for c, _, _ in KAT[:2]], np.uint32).T  # vectorized over a batch of counters
    assert philox4x32_10(ctrs, (0, 0))[:, 0].tolist() == list(KAT[0][2])


# Values printed by torch users on real GPUs (rounded to 4 decimals by torch's repr).
def test_published_seed0_4x8():
    """torch.randn(4, 8, generator=torch.Generator("cuda").manual_seed(0), device="cuda"), first row."""
    row = [-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284]
    np.testing.assert_allclose(CudaGenerator(0).randn((4, 8))[0], row, atol=5.01e-5, rtol=0)


def test_published_small_draws():
    # pytorch/pytorch#79496: torch.manual_seed(10); torch.randn(3, device="cuda")
    np.testing.assert_allclose(CudaGenerator(10).randn(3), [-0.1029, 1.6810, -0.2708], atol=5.01e-5, rtol=0)
    # pytorch/pytorch#158398: randn([1, 64, 2048], seed 42); rows 0 and 1 lie below every GPU's T_max
    x = CudaGenerator(42, *GPU_PRESETS["t4"]).randn((1, 64, 2048))[0]
    for got, want in ((x[0, :3], [0.1940, 2.1614, -0.1721]), (x[0, -3:], [1.4540, -2.7733, -0.8932]),
                      (x[1, :3], [-0.4574, 0.8063, 0.1580]), (x[1, -3:], [0.1124, 0.2769, -1.2535])):
        np.testing.assert_allclose(got, want, atol=5.01e-5, rtol=0)


@pytest.mark.slow
def test_published_large_draw_depends_on_sm_count():
    """pytorch/pytorch#143086: randn(1, 49*12*112*144) seeded 1 on an H100 and an A100 (9.5M elements,
    above both GPUs' T_max): same head, different tails."""
    h100 = CudaGenerator(1, *GPU_PRESETS["h100"]).randn((1, 9_483_264))[0]
    a100 = CudaGenerator(1, *GPU_PRESETS["a100"]).randn((1, 9_483_264))[0]
    for x in (h100, a100):
        np.testing.assert_allclose(x[:3], [-0.2963, 2.6764, -0.1408], atol=5.01e-5, rtol=0)
    np.testing.assert_allclose(h100[-3:], [-0.6970, -0.7780, 0.3267], atol=5.01e-5, rtol=0)
    np.testing.assert_allclose(a100[-3:], [0.1549, -0.6797, -0.1656], atol=5.01e-5, rtol=0)


def _round_f32(q: Fraction) -> np.float32:
    """The float32 nearest to the rational q (ties to even), by exact comparison of neighbours."""
    f = np.float32(float(q))
    cands = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.uint32)) & 1))


def test_box_muller_inputs_are_exact_float32():
    """u = float(x) * 2**-32 + 2**-33 and v = fma(float(y), C, C/2), C = float(2**-32 * 6.2831855f), each
    rounded once to float32, as the device computes them."""
    rng = np.random.default_rng(0)
    words = np.concatenate([rng.integers(0, 2**32, 3000, dtype=np.uint64),
                            [0, 1, 2**24 - 1, 2**24 + 1, 2**31, 2**32 - 256, 2**32 - 129, 2**32 - 1]]).astype(np.uint32)
    u, v = uniforms(words, words[::-1])
    two_pi = Fraction(float(np.float32(6.2831855)))
    c = Fraction(float(np.float32(two_pi * Fraction(1, 2**32))))
    assert c == two_pi / 2**32  # the constant folds exactly
    for i, (x, y) in enumerate(zip(words.tolist(), words[::-1].tolist())):
        xf, yf = Fraction(float(np.float32(x))), Fraction(float(np.float32(y)))
        assert u[i] == _round_f32(xf / 2**32 + Fraction(1, 2**33)), x
        assert v[i] == _round_f32(yf * c + c / 2), y
    assert u.min() > 0 and u.max() == 1 and v.min() > 0 and v.max() == np.float32(6.2831855)  # float(2 pi)


def test_box_muller_against_float32_math():
    """(s sin v, s cos v) with s = sqrtf(-2 logf u): each float32 step within one rounding of exact math."""
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 2**32, (2, 20000), dtype=np.uint64).astype(np.uint32)
    a, b = box_muller(x, y)
    u, v = (t.astype(np.float64) for t in uniforms(x, y))
    s = np.sqrt(-2 * np.log(u))
    tol = 4 * np.spacing(np.abs(s).astype(np.float32)).astype(np.float64)  # sqrt, log, sin/cos, product
    assert np.all(np.abs(a - s * np.sin(v)) <= tol) and np.all(np.abs(b - s * np.cos(v)) <= tol)
    assert a.dtype == b.dtype == np.float32
    edge_a, edge_b = box_muller(np.array([2**32 - 1, 0], np.uint32), np.array([0, 0], np.uint32))
    assert edge_a[0] == 0 and edge_b[0] == 0 and not np.signbit(edge_a[0])  # u rounds to 1: s = 0
    np.testing.assert_allclose(edge_b[1], math.sqrt(66 * math.log(2)), rtol=2e-7)  # u = 2**-33, cos v = 1


def kernel_reference(seed, offset, n, sm_count, max_threads_per_sm):
    """torch's distribution_elementwise_grid_stride_kernel for normal_, one Python thread at a time:
    calc_execution_policy, curand_init(seed, idx, offset), curand_normal4 per grid-stride round."""
    block = 256
    grid = min((n + block - 1) // block, sm_count * (max_threads_per_sm // block))
    stride = block * grid * 4
    out = np.full(n, np.nan, np.float32)
    for idx in range(block * grid):
        ctr = (idx << 64) + offset // 4  # skipahead_sequence(idx), skipahead(offset): a 128-bit counter
        for linear_index in range(idx, ((n - 1) // stride + 1) * stride, stride):
            words = philox4x32_10([[(ctr >> (32 * i)) & 0xFFFFFFFF] for i in range(4)], (seed, seed >> 32))
            lanes = [*box_muller(words[0], words[1]), *box_muller(words[2], words[3])]
            ctr += 1
            for ii in range(4):
                li = linear_index + block * grid * ii
                if li < n:
                    out[li] = lanes[ii][0]
    return out, ((n - 1) // stride + 1) * 4


@pytest.mark.parametrize("n,sm,threads", [(1, 1, 256), (255, 1, 256), (256, 1, 256), (257, 1, 256),
                                          (700, 1, 256), (1024, 1, 256), (1025, 1, 256), (2100, 1, 512),
                                          (3000, 2, 256), (5000, 1, 1024), (600, 3, 1536)])
def test_layout_matches_kernel_loop(n, sm, threads):
    seed, offset = 2**40 + 77, 8
    want, advance = kernel_reference(seed, offset, n, sm, threads)
    gen = CudaGenerator(seed, sm, threads).set_offset(offset)
    got = gen.randn(n)
    assert np.array_equal(got, want)
    assert gen.offset == offset + advance


def test_offset_advance_across_calls(monkeypatch):
    """On a 1-SM, 256-thread GPU (T = 256): four draws of 1024 use counters x = 0..3 with all four lanes,
    exactly the layout of one 4096 draw; draws of 256 take lane 0 of each counter in turn."""
    big = CudaGenerator(5, 1, 256).randn(4096)
    monkeypatch.setattr(rng_cuda, "_CHUNK", 512)  # the same in passes of 2 rounds
    assert np.array_equal(CudaGenerator(5, 1, 256).randn(4096), big)
    monkeypatch.undo()
    gen = CudaGenerator(5, 1, 256)
    parts = [gen.randn(1024) for _ in range(4)]
    assert gen.offset == 16
    assert np.array_equal(np.concatenate(parts), big)
    gen.manual_seed(5)
    assert gen.offset == 0
    for k in range(4):
        assert np.array_equal(gen.randn((16, 16)).ravel(), big[1024 * k:1024 * k + 256])
    assert gen.randn(1025).size == 1025 and gen.offset == 16 + 8  # 1025 > 4T: two rounds
    gen.randn(0)
    assert gen.offset == 24  # empty draws leave the generator alone, as in torch


def test_small_draws_do_not_depend_on_the_gpu():
    """n <= T_max of every GPU compared: identical values, offsets +4 per call, whatever the GPU."""
    shapes = [(1, 4, 64, 64), (2, 4, 8, 8), (37,), (1, 4, 128, 128), (3,)]  # 16384 .. 65536 elements
    gens = [CudaGenerator(123, *GPU_PRESETS[g]) for g in ("h100", "a100", "4090", "l4", "a10g")]
    for shape in shapes:
        draws = [g.randn(shape) for g in gens]
        assert all(np.array_equal(d, draws[0]) for d in draws)
    assert {g.offset for g in gens} == {4 * len(shapes)}
    t4 = CudaGenerator(123, *GPU_PRESETS["t4"])
    assert np.array_equal(t4.randn((1, 4, 64, 64)), CudaGenerator(123).randn((1, 4, 64, 64)))
    assert GPU_PRESETS["t4"][0] * GPU_PRESETS["t4"][1] == 40960 == t4.max_threads
    sdxl = (1, 4, 128, 128)  # 65536 > T4's 40960: the tail past T_max differs, the head does not
    t4, h100 = CudaGenerator(9, *GPU_PRESETS["t4"]), CudaGenerator(9)
    a, b = t4.randn(sdxl).ravel(), h100.randn(sdxl).ravel()
    assert np.array_equal(a[:40960], b[:40960]) and not np.array_equal(a[40960:], b[40960:])
    assert t4.offset == h100.offset == 4  # one round on both (n <= 4 T_max): later draws agree again
    assert np.array_equal(t4.randn(100), h100.randn(100))
    t4.randn(4 * 40960 + 1)  # two rounds on a T4, one on an H100: offsets part, and every later draw
    h100.randn(4 * 40960 + 1)
    assert (t4.offset, h100.offset) == (16, 12) and not np.array_equal(t4.randn(100), h100.randn(100))


def test_seed_uses_all_64_bits_and_float16():
    assert not np.array_equal(CudaGenerator(5).randn(8), CudaGenerator(5 + 2**32).randn(8))
    assert np.array_equal(CudaGenerator(-1).randn(8), CudaGenerator(2**64 - 1).randn(8))
    assert CudaGenerator(-1).seed == 2**64 - 1
    half = CudaGenerator(3).randn((2, 5), dtype=np.float16)
    assert half.dtype == np.float16 and np.array_equal(half, CudaGenerator(3).randn((2, 5)).astype(np.float16))


def test_bad_input():
    for seed in (1.5, "1", 2**64, -(2**63) - 1):
        with pytest.raises(InputError):
            CudaGenerator(seed)
    for kwargs in ({"sm_count": 0}, {"max_threads_per_sm": 128}, {"sm_count": True}):
        with pytest.raises(InputError):
            CudaGenerator(0, **kwargs)
    with pytest.raises(InputError):
        CudaGenerator(0).randn(4, dtype=np.float64)
    with pytest.raises(InputError):
        CudaGenerator(0).randn((2, -1))
    with pytest.raises(InputError):
        CudaGenerator(0).set_offset(6)


def test_parse_rng():
    assert parse_rng().name == "cpu" and isinstance(parse_rng("cpu")(3), TorchGenerator)
    assert parse_rng("cuda").name == "cuda:h100" and parse_rng("CUDA:RTX4090").name == "cuda:4090"
    gen = parse_rng("cuda:4090")(7)
    assert isinstance(gen, CudaGenerator) and (gen.sm_count, gen.max_threads_per_sm) == (128, 1536)
    assert gen.seed == 7 and parse_rng("cuda:4090").infotext == "NV" and parse_rng("cpu").infotext == "CPU"
    custom = parse_rng("cuda:sm=80,threads=1536")
    assert custom.name == "cuda:sm=80,threads=1536" and parse_rng("cuda:sm=114").name == "cuda:sm=114"
    assert np.array_equal(custom(1).randn(200_000), CudaGenerator.for_gpu(1, "a10g").randn(200_000))
    assert parse_rng(parse_rng("cuda:sm=80,threads=1536").name) == custom
    for bad in ("gpu", "cuda:h1000", "cuda:sm=x", "cuda:sm=0", "cuda:sm=8,foo=1", "cuda:sm=8,threads=100"):
        with pytest.raises(InputError):
            parse_rng(bad)


def test_import_without_torch():
    code = "import sys, sdrt.rng; sdrt.rng.CudaGenerator(0).randn(4); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.gpu
def test_against_torch_cuda(record_property):
    """Many shapes, seeds and call sequences against torch on this GPU; records the exact-match fraction
    and the worst difference (``-s`` prints them)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with a CUDA GPU; none here")
    props = torch.cuda.get_device_properties(0)
    sm, threads = props.multi_processor_count, props.max_threads_per_multi_processor
    rng = np.random.default_rng(0)
    sizes = [1, 3, 4, 5, 255, 256, 257, 1023, 4096, 16384, 36864, 65536, 262_144, sm * threads - 1,
             sm * threads, sm * threads + 1, 4 * sm * threads + 5, 921_600, 1_769_472]
    sequences = [[(n,)] for n in sizes] + [[(1, 4, 64, 64)] * 26, [(1, 4, 128, 128), (3,), (2, 4, 96, 96)] * 4,
                                           [(int(m),) for m in rng.integers(1, 3 * sm * threads, 12)]]
    equal = total = 0
    worst = 0.0
    for i, seq in enumerate(sequences):
        seed = int(rng.integers(0, 2**64, dtype=np.uint64)) if i % 2 else i
        ours, theirs = CudaGenerator(seed, sm, threads), torch.Generator("cuda").manual_seed(seed)
        for shape in seq:
            want = torch.randn(shape, generator=theirs, device="cuda").cpu().numpy()
            got = ours.randn(shape)
            equal += int(np.sum(got == want))
            total += want.size
            worst = max(worst, float(np.max(np.abs(got - want))))
            assert ours.offset == theirs.get_offset()
        half = torch.randn((4, 1000), generator=theirs, device="cuda", dtype=torch.float16).cpu().numpy()
        diff = np.abs(ours.randn((4, 1000), dtype=np.float16).astype(np.float32) - half.astype(np.float32))
        assert np.all(diff <= np.spacing(np.abs(half)).astype(np.float32))  # a rounding flip at most
    summary = f"{props.name} ({sm} SMs x {threads}): {equal / total:.6f} of {total} equal, worst {worst:.3g}"
    record_property("cuda_rng", summary)
    print(summary)
    assert worst <= 2e-6, summary
