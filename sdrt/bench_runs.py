"""The measuring loops of ``sdrt bench``: cold starts, warm-ups and timed runs, alternating systems.

Two schedules, same report:
- resident (default): one worker per system for the whole bench, loaded once; runs alternate A B C A B C,
  so every system sees the same minutes of the box.
- ``--one-resident``: each round starts a fresh worker per system, which loads, warms up, runs once and
  exits before the next system starts, so never two systems are in memory (an SDXL-shaped fp32 model
  needs ~14 GB in each). Every round is then also a cold start (the report keeps the first round's and
  the p50 of all); the cold first image counts as the first warm-up of the first point.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

from sdrt import bench_report, machine
from sdrt.bench import MODULES, BenchConfig, _request, peer_systems, plan, unet_work
from sdrt.bench_worker import Worker
from sdrt.errors import SdrtError
from sdrt.manifest import load_manifest
from sdrt.progress import progress_bar

log = logging.getLogger(__name__)


def cold_start(name: str, source: str, cfg: BenchConfig, threads: int, first: dict) -> tuple[Worker, dict, dict]:
    """A fresh worker for one system, loaded and through its first image: (worker, load reply, cold record)."""
    worker = Worker(name, MODULES[name], threads)
    try:
        load = worker.ask("load", engines=source, model=source, threads=threads, mode=cfg.mode, batch=cfg.batch,
                          backend="openvino" if name == "openvino" else cfg.backend)
        loaded = time.perf_counter()
        first_run = worker.ask("run", **first)
    except BaseException:
        worker.close()
        raise
    cold = {"process_start_s": worker.process_start, "load_s": load["seconds"],
            "first_run_s": time.perf_counter() - loaded, "total_s": time.perf_counter() - worker.launched,
            "first_run_stages": first_run["timings"]}
    return worker, load, cold


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every system (cold start, warm-up, alternating timed runs); return the full report."""
    points = plan(cfg)
    manifest = load_manifest(cfg.engines)
    threads = cfg.threads or len(os.sched_getaffinity(0))
    systems, skipped = peer_systems(cfg, manifest)
    cpu = machine.cpu_info(threads)
    log.info("machine: %s; %s", machine.describe(cpu), machine.peak_line(cpu))
    state = {"cold": {}, "loaded": {}, "infos": {}, "rss": {}, "skipped": skipped,
             "samples": [{name: [] for name, _ in systems} for _ in points]}
    per_system = cfg.runs if cfg.one_resident else 1 + len(points) * (cfg.warmup + cfg.runs)
    with progress_bar(total=len(systems) * per_system, desc="bench", unit="run" if not cfg.one_resident else
                      "process") as bar:
        (_one_resident if cfg.one_resident else _resident)(cfg, systems, points, threads, state, bar)
    names = [name for name, _ in systems if name in state["cold"]]
    results = [bench_report.point_summary(point, {n: state["samples"][i][n] for n in names},
                                          unet_work(cfg, manifest, point), cpu) for i, point in enumerate(points)]
    config = asdict(cfg) | {"points": [list(p) for p in points], "compare": list(cfg.compare)}
    cold = {n: state["cold"][n][0] for n in names}
    rep = bench_report.report(config, threads, cold, {n: state["rss"][n] for n in names},
                              {n: state["infos"][n] for n in names}, results)
    if cfg.one_resident:  # every round was a cold start: keep them all
        for n in names:
            rep["systems"][n]["cold_start"]["rounds_total_s"] = [c["total_s"] for c in state["cold"][n]]
            rep["systems"][n]["cold_start"]["rounds_load_s"] = [c["load_s"] for c in state["cold"][n]]
    rep["machine"]["cpu_info"] = cpu
    rep["skipped"] = skipped
    for name, extra in state["loaded"].items():
        rep["systems"][name].update(extra)
    return rep


def _start(name, source, cfg, threads, first, state) -> Worker | None:
    """``cold_start`` recorded into ``state``; a failing peer is skipped (sdrt's own failure raises)."""
    try:
        worker, load, cold = cold_start(name, source, cfg, threads, first)
    except SdrtError as exc:
        if name == "sdrt":
            raise
        log.warning("--compare %s skipped: %s", name, exc)
        state["skipped"][name] = f"failed: {exc}"
        state["cold"].pop(name, None)
        return None
    state["cold"].setdefault(name, []).append(cold)
    state["loaded"][name] = {k: load[k] for k in ("precision", "backend", "notes") if k in load}
    state["infos"][name] = worker.info
    return worker


def _measure(worker, name, cfg, points, state, bar, runs: int, first_is_warm: bool) -> None:
    """Warm-ups then ``runs`` timed runs of every point on one worker."""
    for p, point in enumerate(points):
        request = _request(cfg, point)
        warmups = max(cfg.warmup - (1 if first_is_warm and p == 0 else 0), 0)
        for i in range(warmups + runs):
            phase = f"warmup {i + 1}/{warmups}" if i < warmups else f"run {i + 1 - warmups}/{runs}"
            bar.set_postfix_str(f"{name} {point[0]}x{point[1]} batch {point[2]}: {phase}")
            log.info("%s %dx%d batch %d: %s", name, *point, phase)
            timings = worker.ask("run", **request)["timings"]
            if i >= warmups:
                state["samples"][p][name].append(timings)
        state["rss"][name] = max(state["rss"].get(name, 0), worker.peak_rss)


def _resident(cfg, systems, points, threads, state, bar) -> None:
    workers: dict[str, Worker] = {}
    try:
        first = _request(cfg, points[0])
        for name, source in systems:
            log.info("%s: cold start (fresh process, load, first %dx%d run)", name, *points[0][:2])
            bar.set_postfix_str(f"{name}: cold start")
            worker = _start(name, source, cfg, threads, first, state)
            if worker is not None:
                workers[name] = worker
            bar.update(1)
        for p, point in enumerate(points):
            request = _request(cfg, point)
            for i in range(cfg.warmup + cfg.runs):
                for name, worker in workers.items():
                    phase = f"warmup {i + 1}/{cfg.warmup}" if i < cfg.warmup else f"run {i + 1 - cfg.warmup}/{cfg.runs}"
                    bar.set_postfix_str(f"{name} {point[0]}x{point[1]} batch {point[2]}: {phase}")
                    log.info("%s %dx%d batch %d: %s", name, *point, phase)
                    timings = worker.ask("run", **request)["timings"]
                    bar.update(1)
                    if i >= cfg.warmup:
                        state["samples"][p][name].append(timings)
        for name, worker in workers.items():
            state["rss"][name] = worker.peak_rss
    finally:
        for worker in workers.values():
            worker.close()


def _one_resident(cfg, systems, points, threads, state, bar) -> None:
    first = _request(cfg, points[0])
    active = list(systems)
    for round_ in range(cfg.runs):
        for name, source in list(active):
            log.info("%s: round %d/%d, fresh process (load, first %dx%d run)", name, round_ + 1, cfg.runs,
                     *points[0][:2])
            bar.set_postfix_str(f"{name}: round {round_ + 1}/{cfg.runs}, cold start")
            worker = _start(name, source, cfg, threads, first, state)
            if worker is None:
                active.remove((name, source))
                continue
            try:
                _measure(worker, name, cfg, points, state, bar, 1, first_is_warm=True)
            finally:
                worker.close()  # before the next system starts: one system in memory at a time
            bar.update(1)
