"""The runtime's hard rule and its outputs: ``sdrt`` never imports torch, onnx, diffusers, transformers
(nor onnxscript, polygraphy, onnx_graphsurgeon, scipy), directly or through another package; generation
from an ENGINE_DIR writes PNGs with A1111 parameters, reproducible seeds, batch files and JSON timings."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdrt.pipeline
import sdrt.pipelines.base
from sdrt.cli import main

BLOCKED = ("torch", "onnx", "diffusers", "transformers", "onnxscript", "polygraphy", "onnx_graphsurgeon", "scipy")

# Runs in a fresh interpreter: the blocker is on sys.meta_path before anything else is imported, so a
# blocked package behaves as if it were not installed, whoever asks for it. Imports attempted from sdrt's
# own modules are recorded too (a guarded `try: import torch` in sdrt breaks the rule as well).
ISOLATED = textwrap.dedent("""
    import sys

    BLOCKED = set(sys.argv[1].split(","))
    asked_by_sdrt = []

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] not in BLOCKED:
                return None
            frame = sys._getframe(1)
            while frame and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "?") if frame else "?"
            if importer == "sdrt" or importer.startswith("sdrt."):
                asked_by_sdrt.append(f"{importer} -> {name}")
            raise ModuleNotFoundError(f"{name} is blocked by test_runtime_isolation", name=name)

        def invalidate_caches(self):
            pass

    sys.meta_path.insert(0, Blocker())

    import importlib
    import json
    import pkgutil

    import sdrt

    modules = []
    for info in pkgutil.walk_packages(sdrt.__path__, "sdrt."):
        importlib.import_module(info.name)
        modules.append(info.name)

    from PIL import Image
    from sdrt.cli import main

    engines, out = sys.argv[2], sys.argv[3]
    common = ["--engines", engines, "--prompt", "a photo of a cat", "--steps", "2", "--width", "64",
              "--height", "64", "--seed", "7"]
    codes = {"txt2img": main(["txt2img", *common, "--out", f"{out}/txt2img.png"])}
    codes["img2img"] = main(["img2img", *common, "--image", f"{out}/txt2img.png", "--strength", "0.6",
                             "--out", f"{out}/img2img.png"])
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(f"{out}/mask.png")
    codes["inpaint"] = main(["inpaint", *common, "--image", f"{out}/txt2img.png", "--mask", f"{out}/mask.png",
                             "--out", f"{out}/inpaint.png"])
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
    print("RESULT " + json.dumps({"modules": modules, "codes": codes, "loaded": loaded,
                                  "asked_by_sdrt": asked_by_sdrt}))
""")


def _parameters(path: Path) -> tuple[list[str], dict[str, str]]:
    """A1111 "parameters" chunk -> (lines, {key: value}) of its last line."""
    with Image.open(path) as image:
        text = image.text["parameters"]
    lines = text.split("\n")
    fields = dict(re.findall(r"(?:^|, )([A-Za-z][A-Za-z ]*): ([^,]+)", lines[-1]))
    return lines, fields


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _args(mode, engines, out, *extra) -> list[str]:
    return [mode, "--engines", str(engines), "--prompt", "a photo of a cat", "--steps", "2", "--width", "64",
            "--height", "64", "--out", str(out), *extra]


def test_runtime_imports_and_runs_without_build_side_packages(tiny_engine_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-c", ISOLATED, ",".join(BLOCKED), str(tiny_engine_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    assert result["asked_by_sdrt"] == [], result["asked_by_sdrt"]
    assert result["loaded"] == []
    for module in ("sdrt.cli", "sdrt.pipeline", "sdrt.pipelines.stable_diffusion", "sdrt.generate_cli", "sdrt.backends.ort", "sdrt.images",
                   "sdrt.schedulers.euler_ancestral", "sdrt.tokenizer", "sdrt.rng"):
        assert module in result["modules"]
    assert result["codes"] == {"txt2img": 0, "img2img": 0, "inpaint": 0}, proc.stderr[-4000:]
    for mode in ("txt2img", "img2img", "inpaint"):
        with Image.open(tmp_path / f"{mode}.png") as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    _, fields = _parameters(tmp_path / "img2img.png")
    assert fields["Denoising strength"] == "0.6" and fields["Seed"] == "7"


def test_png_parameters_are_a1111(tiny_engine_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(_args("txt2img", tiny_engine_dir, out, "--negative-prompt", "blurry, low quality",
                      "--seed", "42", "--scheduler", "Euler a", "--height", "72")) == 0
    assert str(out) in capsys.readouterr().out
    lines, fields = _parameters(out)
    assert lines[0] == "a photo of a cat"
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert len(lines) == 3
    assert lines[2].startswith("Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x72")
    assert fields == {"Steps": "2", "Sampler": "Euler a", "CFG scale": "7.5", "Seed": "42", "Size": "64x72", "RNG": "CPU"}
    with Image.open(out) as image:
        assert image.size == (64, 72)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # no temp file left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's owner-only 0600


def test_random_seed_is_recorded_and_reproduces(tiny_engine_dir, tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main(_args("txt2img", tiny_engine_dir, first)) == 0
    printed = capsys.readouterr().out
    lines, fields = _parameters(first)
    assert len(lines) == 2 and not lines[1].startswith("Negative prompt:")  # none given, no line
    seed = fields["Seed"]
    assert seed.isdigit() and f"seed {seed}" in printed  # the random seed is printed and recorded
    assert main(_args("txt2img", tiny_engine_dir, again, "--seed", seed)) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    assert _parameters(again) == (lines, fields)


def test_batch_writes_numbered_files(tiny_engine_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(_args("txt2img", tiny_engine_dir, out, "--batch", "2", "--seed", "3")) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-1.png", "cat-2.png"]
    one, two = _pixels(tmp_path / "cat-1.png"), _pixels(tmp_path / "cat-2.png")
    assert one.shape == two.shape == (64, 64, 3)
    assert not np.array_equal(one, two)  # each image of the batch has its own noise
    assert _parameters(tmp_path / "cat-1.png")[1]["Seed"] == "3"


@pytest.mark.parametrize("steps", [1, 2])
def test_json_timings(steps, tiny_engine_dir, tmp_path, capsys, monkeypatch):
    real_open, unet_calls = sdrt.pipelines.base.open_engine, []

    def counting_open(manifest, name, *args, **kwargs):
        engine = real_open(manifest, name, *args, **kwargs)
        if name != "unet":
            return engine
        return lambda feeds: (unet_calls.append(1), engine(feeds))[1]

    monkeypatch.setattr(sdrt.pipelines.base, "open_engine", counting_open)
    out = tmp_path / "cat.png"
    assert main(_args("txt2img", tiny_engine_dir, out, "--steps", str(steps), "--seed", "5", "--json")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is the JSON alone
    assert summary["images"] == [str(out)] and summary["seed"] == 5
    timings = summary["timings_s"]
    for stage in ("tokenize", "text_encoder", "loop_overhead", "vae_decode", "total"):
        assert isinstance(timings[stage], float) and timings[stage] >= 0, stage
    assert isinstance(timings["unet"], list) and len(timings["unet"]) == len(unet_calls) >= steps
    assert all(isinstance(t, float) and t > 0 for t in timings["unet"])
    assert timings["total"] >= sum(timings["unet"]) + timings["vae_decode"]
    assert summary["parameters"]["steps"] == steps
