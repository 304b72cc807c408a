"""The machine a benchmark ran on: CPU model, SIMD flags, cores, load, and the CPU's fp32 peak.

One helper for every benchmark script (``sdrt bench``, ``benchmarks/*.py``), so each result names
its CPU the same way. The fp32 peak is cores × FMA pipes × SIMD lanes × 2 FLOPs × clock, each factor
stated in ``cpu_info()["peak"]`` with where it came from: the pipes and lanes per core follow the
vendor's optimization manuals (Intel AVX-512 server cores: two 512-bit FMA units; AMD Zen 2-4: two
256-bit FMA pipes, Zen 4 running AVX-512 as two 256-bit halves; Zen 5: 512-bit pipes), the clock is
the highest the kernel reports (cpufreq ``cpuinfo_max_freq``, else ``cpu MHz``, which a hypervisor
often pins at the nominal rate). ``SDRT_CPU_GHZ`` overrides the clock when the true one is known.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# The flags that decide which kernels the runtimes pick (MLAS, oneDNN in OpenVINO, ggml).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
CLOCK_ENV = "SDRT_CPU_GHZ"


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as {key: value} (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (SMT siblings count once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((base.joinpath("physical_package_id").read_text().strip(),
                       base.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return len(cores)


def _clock(info: dict[str, str]) -> tuple[float, str]:
    if os.environ.get(CLOCK_ENV):
        return float(os.environ[CLOCK_ENV]), f"${CLOCK_ENV}"
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        return float(info["cpu MHz"]) / 1e3, "/proc/cpuinfo cpu MHz (a VM's nominal rate; turbo may be higher)"
    except (KeyError, ValueError):
        return 0.0, "unknown"


def _fma_units(vendor: str, family: int, flags: set[str]) -> tuple[int, int, str]:
    """(FMA pipes per core, fp32 lanes per pipe, why)."""
    if vendor == "AuthenticAMD":
        if family >= 0x1A and "avx512f" in flags:
            return 2, 16, "Zen 5: two 512-bit FMA pipes"
        if "avx2" in flags:
            return 2, 8, "Zen 2-4: two 256-bit FMA pipes (Zen 4 splits AVX-512 into 256-bit halves)"
    if "avx512f" in flags:
        return 2, 16, "Intel AVX-512 server core: two 512-bit FMA units (some Xeon Silver/Bronze have one)"
    if "fma" in flags:
        return 2, 8, "two 256-bit FMA units (AVX2)"
    return 1, 4, "no FMA: one 128-bit SSE pipe counted as FMA (upper bound)"


def cpu_info(threads: int | None = None) -> dict:
    """CPU model, vendor, SIMD flags, cores, load average and the fp32 peak with its factors; with
    ``threads``, the peak of that many cores (one thread per physical core at most)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    try:
        family = int(info.get("cpu family", "0"))
    except ValueError:
        family = 0
    cores = physical_cores()
    used = min(threads, cores) if threads else cores
    pipes, lanes, why = _fma_units(vendor, family, flags)
    ghz, clock_source = _clock(info)
    peak = used * pipes * lanes * 2 * ghz  # GFLOP/s: an FMA is 2 FLOPs
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(), "vendor": vendor,
        "family": family, "flags": [f for f in SIMD_FLAGS if f in flags], "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": cores, "load_average": load, "platform": platform.platform(),
        "python": sys.version.split()[0],
        "peak": {"fp32_gflops": peak, "cores": used, "fma_pipes": pipes, "lanes": lanes, "ghz": ghz,
                 "clock_source": clock_source, "pipes_source": why},
    }


def peak_line(cpu: dict) -> str:
    """'fp32 peak 256 GFLOP/s = 2 cores × 2 FMA pipes × 16 lanes × 2 × 2.00 GHz (...)'."""
    p = cpu["peak"]
    return (f"fp32 peak {p['fp32_gflops']:.0f} GFLOP/s = {p['cores']} cores × {p['fma_pipes']} FMA pipes × "
            f"{p['lanes']} fp32 lanes × 2 FLOP × {p['ghz']:.2f} GHz ({p['pipes_source']}; clock: {p['clock_source']})")


def describe(cpu: dict | None = None) -> str:
    """One line naming the CPU, its cores, flags and load average, for a benchmark's header."""
    cpu = cpu or cpu_info()
    load = "/".join(f"{x:.1f}" for x in cpu["load_average"]) or "n/a"
    return (f"{cpu['model']}, {cpu['physical_cores']} physical cores ({cpu['usable_cpus']} usable CPUs); flags: "
            f"{' '.join(cpu['flags']) or 'n/a'}; load average {load}")
