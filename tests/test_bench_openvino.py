"""``--backend openvino`` (adopted from ``sdrt bench --compare openvino``; benchmarks/NOTES.md): images
against ONNX Runtime in f32, the precision OpenVINO picks reported, ``sdrt verify`` holding a bf16 run
to the bf16 tolerance. Skipped where the openvino package is not installed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")

from sdrt.backends.openvino import PRECISION_ENV, OpenVinoEngine  # noqa: E402
from sdrt.cli import main  # noqa: E402
from sdrt.machine import cpu_info  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.specs import UNET  # noqa: E402

@pytest.fixture(scope="module")
def engines(tiny_engine_dir, tmp_path_factory):
    """A copy of the shared artifact: the openvino backend keeps its compiled shapes in ENGINE_DIR."""
    out = tmp_path_factory.mktemp("openvino") / "tiny"
    shutil.copytree(tiny_engine_dir, out)
    return out


REQUEST = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=3, seed=7, width=64, height=96,
               scheduler="Euler a")


def _expected_precision() -> str:
    return "bf16" if "avx512_bf16" in cpu_info()["flags"] else "f32"


def test_openvino_f32_matches_onnx_runtime(engines, monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "f32")
    ours = Pipeline(engines, backend="openvino", threads=1)
    reference = Pipeline(engines, backend="ort-cpu", threads=1).txt2img(**REQUEST).unit_images
    got = ours.txt2img(**REQUEST).unit_images
    assert isinstance(ours.engine(UNET), OpenVinoEngine) and ours.engine(UNET).precision == "f32"
    assert np.abs(got - reference).max() < 1e-4


def test_openvino_default_precision_is_reported_and_close(engines, monkeypatch):
    """Without the variable OpenVINO chooses (bf16 with AVX512_BF16); the engine says which it ran."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    ours = Pipeline(engines, backend="openvino", threads=1)
    got = ours.txt2img(**REQUEST).unit_images
    reference = Pipeline(engines, threads=1).txt2img(**REQUEST).unit_images
    assert ours.engine(UNET).precision == _expected_precision()
    error = np.abs(got - reference).max()
    assert error < (0.1 if ours.engine(UNET).precision == "bf16" else 1e-4)
    second = ours.txt2img(**{**REQUEST, "width": 96, "height": 64}).unit_images  # a second compiled shape
    assert second.shape[1:3] == (64, 96) and np.isfinite(second).all()  # NHWC


def test_verify_holds_openvino_bf16_to_the_bf16_tolerance(tiny_model_dir, engines, monkeypatch, capsys):
    from sdrt_export.verify import BF16_IMAGE

    monkeypatch.delenv(PRECISION_ENV, raising=False)
    code = main(["verify", "--model", str(tiny_model_dir), "--engines", str(engines), "--backend", "openvino",
                 "--steps", "3", "--width", "64", "--height", "64", "--json"])
    report = json.loads(capsys.readouterr().out)
    expected = _expected_precision()
    assert code == 0 and report["backend"] == "openvino" and not report["failed"]
    assert report["precision"] == ("bf16" if expected == "bf16" else "fp32")
    assert report["tolerance_max_abs"] == (BF16_IMAGE if expected == "bf16" else 1e-4)


def test_bad_precision_variable_exits_2(engines, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PRECISION_ENV, "int3")
    code = main(["txt2img", "--engines", str(engines), "--prompt", "x", "--backend", "openvino",
                 "--steps", "1", "--width", "64", "--height", "64", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and PRECISION_ENV in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()
