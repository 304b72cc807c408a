"""Statistics, JSON report, terminal table and PNG plot of ``sdrt bench`` (no torch; matplotlib lazily)."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from sdrt.errors import SdrtError

STAT_KEYS = ("p50", "p90", "p99", "min")
STAGE_ORDER = ("tokenize", "text_encoder", "unet_call", "unet_total", "loop_overhead_step", "vae_encode",
               "vae_decode", "end_to_end")
PLOT_STAGES = ("text_encoder", "unet_call", "loop_overhead_step", "vae_decode", "end_to_end")


def stats(values) -> dict:
    """p50 / p90 / p99 / min (and mean, n) of a list of seconds."""
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "min": float(a.min()),
            "mean": float(a.mean()), "n": int(a.size)}


def stage_samples(runs: list[dict]) -> dict[str, list[float]]:
    """Per-stage samples over runs: one per run, except UNet calls (every call pooled)."""
    out: dict[str, list[float]] = {}
    for timings in runs:
        for stage, value in timings.items():
            if isinstance(value, list):
                out.setdefault(stage, []).extend(value)
                out.setdefault("unet_total", []).append(sum(value))
            else:
                out.setdefault(stage, []).append(value)
    return out


def point_summary(point, samples: dict[str, list[dict]]) -> dict:
    """Stats per system and stage at one (width, height, batch), and sdrt / other ratios of the p50s."""
    width, height, batch = point
    systems = {name: {stage: stats(v) for stage, v in stage_samples(runs).items()} for name, runs in samples.items()}
    summary = {"width": width, "height": height, "batch": batch, "systems": systems}
    if "diffusers" in systems:
        ours, theirs = systems["sdrt"], systems["diffusers"]
        summary["ratios"] = {s: ours[s]["p50"] / theirs[s]["p50"] for s in ours if s in theirs and theirs[s]["p50"] > 0}
    return summary


def machine(infos: dict) -> dict:
    """CPU, cores and library versions (torch/diffusers as reported by the diffusers worker)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
           "platform": platform.platform(), "python": sys.version.split()[0]}
    for info in infos.values():
        out.update(info)
    return out


def report(config: dict, threads: int, cold: dict, rss: dict, infos: dict, points: list[dict]) -> dict:
    """Every measured field, for tools; ``ratios`` (sdrt / diffusers) when diffusers ran."""
    systems = {name: {"cold_start": cold[name], "peak_rss_bytes": rss[name]} for name in cold}
    out = {"config": config, "threads": threads,
           "threads_note": "same count for both: ORT intra_op_num_threads (sdrt), torch.set_num_threads (diffusers)",
           "machine": machine(infos), "systems": systems, "points": points}
    if "diffusers" in systems:
        ours, theirs = systems["sdrt"], systems["diffusers"]
        out["ratios"] = {**points[0]["ratios"],
                         "cold_start": ours["cold_start"]["total_s"] / theirs["cold_start"]["total_s"],
                         "peak_rss": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]}
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def table(rep: dict) -> str:
    """The terminal table: one block per point, then cold start and peak RSS."""
    c, names = rep["config"], list(rep["systems"])
    lines = [f"sdrt bench: {c['mode']}, {c['steps']} steps, scheduler {c['scheduler'] or 'model default'}, "
             f"guidance {c['guidance']}, seed {c['seed']}, {c['runs']} runs after {c['warmup']} warmup; "
             f"{rep['threads']} threads for every system ({rep['machine']['cpu']})"]
    for point in rep["points"]:
        lines.append(f"\n{point['width']}x{point['height']} batch {point['batch']}")
        header = f"  {'stage':<20}" + "".join(f"{n + ' ' + k:>17}" for n in names for k in ("p50", "p90", "p99", "min"))
        lines.append(header + (f"{'ratio p50':>11}" if "ratios" in point else ""))
        for stage in STAGE_ORDER:
            if not any(stage in point["systems"][n] for n in names):
                continue
            row = f"  {stage:<20}"
            for n in names:
                s = point["systems"][n].get(stage)
                row += "".join(f"{_ms(s[k]) if s else '-':>17}" for k in STAT_KEYS)
            if "ratios" in point:
                row += f"{point['ratios'][stage]:>11.2f}" if stage in point["ratios"] else f"{'-':>11}"
            lines.append(row)
    lines.append("\ncold start (fresh process -> first image)")
    for n in names:
        cs = rep["systems"][n]["cold_start"]
        lines.append(f"  {n:<10} total {cs['total_s']:7.2f} s = process start {cs['process_start_s']:.2f} s"
                     f" + load/session creation {cs['load_s']:.2f} s + first run {cs['first_run_s']:.2f} s")
    lines.append("peak RSS per process")
    for n in names:
        lines.append(f"  {n:<10} {rep['systems'][n]['peak_rss_bytes'] / 2**30:7.2f} GiB")
    if "ratios" in rep:
        r = rep["ratios"]
        lines.append(f"sdrt / diffusers: end to end {r['end_to_end']:.2f}, loop overhead/step "
                     f"{r['loop_overhead_step']:.3f}, cold start {r['cold_start']:.2f}, peak RSS {r['peak_rss']:.2f}")
    return "\n".join(lines)


def plot(rep: dict, path: str) -> None:
    """Latency (p50) against resolution per stage, one line per system, at the smallest batch measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SdrtError("--plot needs matplotlib: pip install 'sdrt[bench]'") from None
    batch = min(p["batch"] for p in rep["points"])
    points = sorted((p for p in rep["points"] if p["batch"] == batch), key=lambda p: p["width"] * p["height"])
    fig, axes = plt.subplots(1, len(PLOT_STAGES), figsize=(4 * len(PLOT_STAGES), 3.6))
    for ax, stage in zip(axes, PLOT_STAGES):
        for name, style in zip(rep["systems"], ("o-", "s--")):
            xs = [p["width"] for p in points if stage in p["systems"][name]]
            ys = [p["systems"][name][stage]["p50"] * 1e3 for p in points if stage in p["systems"][name]]
            ax.plot(xs, ys, style, label=name)
        ax.set(title=stage, xlabel="image side (px)", ylabel="p50 latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"batch {batch}, {rep['config']['steps']} steps, {rep['threads']} threads")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise SdrtError(f"cannot write --plot {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
