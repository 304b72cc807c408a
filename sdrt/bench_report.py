"""Statistics, JSON report, terminal table and PNG plot of ``sdrt bench`` (no torch; matplotlib lazily)."""

from __future__ import annotations

import os

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


def point_summary(point, samples: dict[str, list[dict]], work: dict | None = None, cpu: dict | None = None) -> dict:
    """Stats per system and stage at one (width, height, batch); sdrt / other ratios of the p50s
    (``ratios``: against diffusers, ``ratios_by_system``: against every peer); with ``work`` (the UNet's
    FLOPs per call) each system's UNet GFLOP/s at its p50, and with ``cpu`` the share of the fp32 peak."""
    width, height, batch = point
    systems = {name: {stage: stats(v) for stage, v in stage_samples(runs).items()} for name, runs in samples.items()}
    summary = {"width": width, "height": height, "batch": batch, "systems": systems}
    ours = systems["sdrt"]
    by_system = {name: {s: ours[s]["p50"] / theirs[s]["p50"] for s in ours if s in theirs and theirs[s]["p50"] > 0}
                 for name, theirs in systems.items() if name != "sdrt"}
    if by_system:
        summary["ratios_by_system"] = by_system
    if "diffusers" in by_system:
        summary["ratios"] = by_system["diffusers"]
    if work:
        summary["unet_work"] = work
    if work and "flops" in work:
        peak = (cpu or {}).get("peak", {}).get("fp32_gflops") or 0
        summary["unet_gflops"] = {}
        for name, stages in systems.items():
            if "unet_call" in stages and stages["unet_call"]["p50"] > 0:
                gflops = work["flops"] / stages["unet_call"]["p50"] / 1e9
                summary["unet_gflops"][name] = {"gflops": gflops, "peak_share": gflops / peak if peak else None}
    return summary


def machine(infos: dict) -> dict:
    """CPU, cores and library versions (torch/diffusers as reported by the diffusers worker)."""
    from sdrt.machine import cpu_info

    cpu = cpu_info()
    out = {"cpu": cpu["model"], "cores": os.cpu_count(), "usable_cores": cpu["usable_cpus"],
           "flags": cpu["flags"], "platform": cpu["platform"], "python": cpu["python"]}
    for info in infos.values():
        out.update(info)
    return out


def report(config: dict, threads: int, cold: dict, rss: dict, infos: dict, points: list[dict]) -> dict:
    """Every measured field, for tools; ``ratios`` (sdrt / diffusers) when diffusers ran."""
    systems = {name: {"cold_start": cold[name], "peak_rss_bytes": rss[name]} for name in cold}
    out = {"config": config, "threads": threads,
           "threads_note": "same count for every system: ORT intra_op_num_threads (sdrt), torch.set_num_threads "
                           "(diffusers), INFERENCE_NUM_THREADS (openvino), n_threads (sdcpp)",
           "machine": machine(infos), "systems": systems, "points": points}
    ours, by_system = systems["sdrt"], {}
    for name, theirs in systems.items():
        if name != "sdrt":
            by_system[name] = {**points[0].get("ratios_by_system", {}).get(name, {}),
                               "cold_start": ours["cold_start"]["total_s"] / theirs["cold_start"]["total_s"],
                               "peak_rss": ours["peak_rss_bytes"] / max(theirs["peak_rss_bytes"], 1)}
    if by_system:
        out["ratios_by_system"] = by_system
    if "diffusers" in by_system:
        out["ratios"] = by_system["diffusers"]
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def table(rep: dict) -> str:
    """The terminal table: one block per point (stages, sdrt / peer ratios, UNet GFLOP/s), then cold
    start, peak RSS, the peers skipped and the machine with its fp32 peak."""
    from sdrt.machine import describe, peak_line

    c, names = rep["config"], list(rep["systems"])
    keys = STAT_KEYS if len(names) <= 2 else ("p50", "min")
    peers = [n for n in names if n != "sdrt"]
    precision = ", ".join(f"{n} {rep['systems'][n].get('precision') or '?'}" for n in names)
    lines = [f"sdrt bench: {c['mode']}, {c['steps']} steps, scheduler {c['scheduler'] or 'model default'}, "
             f"guidance {c['guidance']}, seed {c['seed']}, {c['runs']} runs after {c['warmup']} warmup; "
             f"{rep['threads']} threads for every system ({rep['machine']['cpu']}); precision: {precision}"]
    for point in rep["points"]:
        lines.append(f"\n{point['width']}x{point['height']} batch {point['batch']}")
        ratios = point.get("ratios_by_system", {})
        lines.append(f"  {'stage':<20}" + "".join(f"{n + ' ' + k:>17}" for n in names for k in keys)
                     + "".join(f"{'sdrt/' + n:>15}" for n in peers))
        for stage in STAGE_ORDER:
            if not any(stage in point["systems"][n] for n in names):
                continue
            row = f"  {stage:<20}"
            for n in names:
                s = point["systems"][n].get(stage)
                row += "".join(f"{_ms(s[k]) if s else '-':>17}" for k in keys)
            row += "".join(f"{ratios[n][stage]:>15.2f}" if stage in ratios.get(n, {}) else f"{'-':>15}" for n in peers)
            lines.append(row)
        work = point.get("unet_work", {})
        if "flops" in work:
            lines.append(f"  UNet call = {work['flops'] / 1e9:,.1f} GFLOP (batch {work['unet_batch']}; {work['graph']})"
                         + "".join(f"; {n} {g['gflops']:.0f} GFLOP/s" + (f" = {g['peak_share']:.0%} of fp32 peak"
                                                                           if g["peak_share"] else "")
                                   for n, g in point.get("unet_gflops", {}).items()))
        elif work:
            lines.append(f"  UNet GFLOP/s: {work['error']}")
    lines.append("\ncold start (fresh process -> first image)")
    for n in names:
        cs = rep["systems"][n]["cold_start"]
        lines.append(f"  {n:<10} total {cs['total_s']:7.2f} s = process start {cs['process_start_s']:.2f} s"
                     f" + load/session creation {cs['load_s']:.2f} s + first run {cs['first_run_s']:.2f} s")
    lines.append("peak RSS per process")
    for n in names:
        lines.append(f"  {n:<10} {rep['systems'][n]['peak_rss_bytes'] / 2**30:7.2f} GiB")
    for n, r in rep.get("ratios_by_system", {}).items():
        lines.append(f"sdrt / {n}: end to end {r.get('end_to_end', float('nan')):.2f}, UNet call "
                     f"{r.get('unet_call', float('nan')):.2f}, cold start {r['cold_start']:.2f}, "
                     f"peak RSS {r['peak_rss']:.2f}"
                     + (f", loop overhead/step {r['loop_overhead_step']:.3f}" if "loop_overhead_step" in r else ""))
    for n, why in rep.get("skipped", {}).items():
        lines.append(f"skipped {n}: {why}")
    cpu = rep["machine"].get("cpu_info")
    if cpu:
        lines += [f"machine: {describe(cpu)}", peak_line(cpu)]
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
        for name, style in zip(rep["systems"], ("o-", "s--", "^-.", "d:")):
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
