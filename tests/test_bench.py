"""``sdrt bench``: smoke runs on the tiny artifact (sdrt alone, sweep, against diffusers) and bad input.
Timings are only checked for presence and sign, never against a bound."""

from __future__ import annotations

import importlib.util
import json

import pytest

from sdrt.cli import main

TINY = ["--width", "64", "--height", "64", "--steps", "2", "--runs", "2", "--warmup", "1", "--threads", "1"]
STAGES = ("tokenize", "text_encoder", "unet_call", "unet_total", "loop_overhead_step", "vae_decode", "end_to_end")
COLD = ("process_start_s", "load_s", "first_run_s", "total_s", "first_run_stages")


def _check_system(report: dict, name: str, point: dict, stages=STAGES) -> None:
    for stage in stages:
        stats = point["systems"][name][stage]
        assert set(stats) >= {"p50", "p90", "p99", "min"}, (name, stage)
        assert 0 <= stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"], (name, stage)
    system = report["systems"][name]
    assert set(system["cold_start"]) >= set(COLD)
    assert system["cold_start"]["total_s"] >= system["cold_start"]["load_s"] > 0
    assert system["peak_rss_bytes"] > 0


def test_bench_against_diffusers_writes_every_field(tiny_engine_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--engines", str(tiny_engine_dir), *TINY, "--compare-diffusers", str(tiny_model_dir),
                 "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and "threads" in capsys.readouterr().out
    assert set(report["machine"]) >= {"cpu", "cores", "python", "numpy", "onnxruntime", "torch", "diffusers"}
    (point,) = report["points"]
    assert (point["width"], point["height"], point["batch"]) == (64, 64, 1)
    for name in ("sdrt", "diffusers"):
        _check_system(report, name, point)
    assert point["systems"]["sdrt"]["unet_call"]["n"] == point["systems"]["diffusers"]["unet_call"]["n"]
    assert set(point["ratios"]) >= set(STAGES)
    assert set(report["ratios"]) >= {"end_to_end", "loop_overhead_step", "cold_start", "peak_rss"}
    assert all(v > 0 for v in report["ratios"].values())


def test_bench_sweep_img2img_and_plot(tiny_engine_dir, tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    code = main(["bench", "--engines", str(tiny_engine_dir), "--steps", "1", "--runs", "1", "--warmup", "0",
                 "--sweep", "--mode", "img2img", "--strength", "1.0", "--json", str(out), *plot])
    assert code == 0
    report = json.loads(out.read_text())
    assert [(p["width"], p["batch"]) for p in report["points"]] == [(256, 1), (256, 2)]  # clipped to 64..256, <= 2
    assert "ratios" not in report and list(report["systems"]) == ["sdrt"]
    for point in report["points"]:
        _check_system(report, "sdrt", point, STAGES + ("vae_encode",))
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [
    ["--runs", "0"],
    ["--warmup", "-1"],
    ["--width", "1024", "--height", "64"],
    ["--mode", "inpaint"],
    ["--compare-diffusers", "/nonexistent/model"],
])
def test_bench_bad_input_exits_2_with_one_line(tiny_engine_dir, args, capsys):
    assert main(["bench", "--engines", str(tiny_engine_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdrt bench: error:") and "\n" not in err


def test_bench_missing_engines_exits_2(tmp_path, capsys):
    assert main(["bench", "--engines", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_ort_cache_gives_the_same_images(tiny_engine_dir, tmp_path, monkeypatch):
    """SDRT_ORT_CACHE (the optimized-graph cache the benchmark uses) is written once, then read back."""
    from sdrt.pipeline import Pipeline

    request = dict(steps=2, width=64, height=64, seed=3)
    plain = Pipeline(tiny_engine_dir, threads=1).txt2img("a cat", **request).images
    monkeypatch.setenv("SDRT_ORT_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # first fills the cache, second opens the cached graphs
        assert (Pipeline(tiny_engine_dir, threads=1).txt2img("a cat", **request).images == plain).all()
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["text_encoder", "unet", "vae_decoder"]
