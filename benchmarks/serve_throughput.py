"""Throughput at saturation of ``sdrt serve``: one process (one Pipeline, all threads; and
at one thread) against ``sdrt serve --ray --replicas 2`` (two Pipelines, threads split between them), same
machine, same load.

    python benchmarks/serve_throughput.py --engines ENGINE_DIR [--clients 4 --requests 24 --steps 20 --size 128]
    python benchmarks/serve_throughput.py --sd15 ENGINE_DIR        # SD1.5-shaped artifact: 256x256, 20 steps

Each server is started on 127.0.0.1 (a free port), warmed up, then ``--clients`` threads post A1111
``txt2img`` requests back to back (``--requests`` in all, distinct seeds) so the queue never empties.
Reports images/s and p50/p99 latency per mode, writes ``--json`` and renders its own section of
``benchmarks/RESULTS.md`` (between the ``serve_throughput`` markers; the rest of the file is left alone).
The 1-minute load average before and after each mode is recorded: on a shared machine it says how much
the figures can be trusted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

BEGIN, END = "<!-- serve_throughput:begin -->", "<!-- serve_throughput:end -->"


def free_port() -> int:
    """Below Linux's ephemeral range, which Ray's processes draw from while it starts."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("no free port in 20000-32000")


def machine() -> dict:
    """CPU model, cores, SIMD flags (sdrt.machine, shared by every benchmark), platform and python."""
    from sdrt.machine import cpu_info

    info = cpu_info()
    return {"cpu": info["model"], "cores": info["logical_cpus"], "flags": info["flags"],
            "platform": info["platform"], "python": info["python"]}


def model_label(engines: str) -> str:
    try:
        family = json.loads((Path(engines) / "manifest.json").read_text()).get("family")
    except (OSError, ValueError):
        family = None
    return f"{Path(engines).name} ({family} family)" if family else Path(engines).name


def load1() -> float:
    return os.getloadavg()[0]


def modes(threads: int) -> dict:
    """mode -> (Ray replicas or 0 for one process, ONNX Runtime threads per Pipeline, label). The one-thread
    single process separates what the thread count does from what the second Pipeline does."""
    half = max(1, threads // 2)
    return {"local": (0, threads, f"one process, {threads} threads"),
            "local-1": (0, 1, "one process, 1 thread"),
            "ray": (2, half, f"Ray, 2 replicas × {half} thread{'s' if half > 1 else ''}")}


def start(mode: str, engines: str, threads: int, log_path: Path):
    port = free_port()
    replicas, per_pipeline, _ = modes(threads)[mode]
    cmd = [sys.executable, "-m", "sdrt.cli", "serve", "--engines", engines, "--host", "127.0.0.1", "--port",
           str(port), "--max-queue", "1000", "--max-steps", "1000", "--threads", str(per_pipeline)]
    if replicas:
        cmd += ["--ray", "--replicas", str(replicas)]
    log = open(log_path, "w")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{mode} server exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{mode} server not ready in 600 s; see {log_path}")


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def post(url: str, seed: int, args) -> tuple[float, str]:
    body = {"prompt": "a photo of a cat", "negative_prompt": "", "steps": args.steps, "cfg_scale": 7.5,
            "seed": seed, "width": args.size, "height": args.size, "sampler_name": "Euler a"}
    t = time.perf_counter()
    response = requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=3600)
    response.raise_for_status()
    return time.perf_counter() - t, response.headers.get("X-Sdrt-Replica", "")


def measure(mode: str, args, log_dir: Path) -> dict:
    load_before = load1()
    proc, url = start(mode, args.engines, args.threads, log_dir / f"{mode}.log")
    try:
        for seed in range(args.warmup):  # every replica opens its engines at start; this warms caches
            post(url, 10_000 + seed, args)
        latencies, replicas, lock = [], {}, threading.Lock()
        seeds = iter(range(args.requests))

        def client():
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                seconds, replica = post(url, seed, args)
                with lock:
                    latencies.append(seconds)
                    replicas[replica] = replicas.get(replica, 0) + 1

        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
    finally:
        stop(proc)
    lat = np.asarray(latencies)
    return {"mode": mode, "images": len(lat), "wall_s": wall, "images_per_s": len(lat) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "replicas": len(replicas), "per_replica": sorted(replicas.values()),
            "load_before": load_before, "load_after": load1()}


def render(rep: dict) -> str:
    m, c = rep["machine"], rep["config"]
    local, ray, one = rep["modes"]["local"], rep["modes"]["ray"], rep["modes"].get("local-1")
    rows = ["| mode | images | images/s | p50 latency | p99 latency | replicas (requests each) | load1 before/after |",
            "|---|---|---|---|---|---|---|"]
    for key, r in rep["modes"].items():
        rows.append(f"| {modes(c['threads'])[key][2]} | {r['images']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} s | "
                    f"{r['p99_s']:.2f} s | {r['replicas']} ({', '.join(map(str, r['per_replica']))}) | "
                    f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    return "\n".join([
        BEGIN, "## sdrt serve: throughput at saturation, one process vs Ray Serve (generated)", "",
        "Generated by `benchmarks/serve_throughput.py` (do not edit by hand); notes in NOTES.md § Serving throughput.", "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; flags: {', '.join(m['flags']) or 'n/a'}; {m['platform']}; "
        f"python {m['python']}",
        f"- model: `{c['model']}`; A1111 txt2img {c['size']}×{c['size']}, {c['steps']} steps, Euler a, CFG 7.5; "
        f"{c['clients']} clients back to back, {c['requests']} requests per mode after {c['warmup']} warm-up",
        f"- {c['note']}", "", *rows, "",
        f"Ray / one process: {ray['images_per_s'] / local['images_per_s']:.2f}× images/s, "
        f"p50 {ray['p50_s'] / local['p50_s']:.2f}×"
        + (f"; Ray / one process at 1 thread: {ray['images_per_s'] / one['images_per_s']:.2f}× images/s."
           if one else "."), END])


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", help="ENGINE_DIR (e.g. the tiny model's)")
    parser.add_argument("--sd15", metavar="ENGINE_DIR", help="an SD1.5-shaped ENGINE_DIR: 256x256, fewer requests")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the one process")
    parser.add_argument("--note", default="machine shared with other jobs during the run (see load1)")
    parser.add_argument("--json", default="benchmarks/serve_throughput.json")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.sd15:
        args.engines, args.size, args.requests, args.warmup = args.sd15, 256, min(args.requests, 8), 1
    if not args.engines:
        parser.error("give --engines ENGINE_DIR or --sd15 ENGINE_DIR")
    log_dir = Path(tempfile.mkdtemp(prefix="serve_throughput-"))
    rep = {"machine": machine(), "modes": {},
           "config": {"model": model_label(args.engines), "size": args.size, "steps": args.steps,
                      "clients": args.clients, "requests": args.requests, "warmup": args.warmup,
                      "threads": args.threads, "note": args.note}}
    for mode in ("local", "local-1", "ray"):
        rep["modes"][mode] = measure(mode, args, log_dir)
        print(json.dumps(rep["modes"][mode]), flush=True)
    Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    write_section(Path(args.results), render(rep))
    print(f"wrote {args.json} and its section of {args.results} (server logs in {log_dir})")


if __name__ == "__main__":
    main()
