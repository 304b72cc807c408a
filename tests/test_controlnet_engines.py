"""ControlNet components through ``--precision fp16`` and ``sdrt build-engines`` (TensorRT-RTX builds ahead of time
on the CPU, as tests/test_build_engines.py): engines for controlnet_0 and unet_control are built and recorded
like every other component; the fp16 artifact still matches diffusers' ControlNet pipeline within the fp16
bound (``sdrt verify``)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from sdrt.cli import main
from sdrt.manifest import load_manifest
from sdrt_export import controlnet as cn

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="needs tensorrt_rtx (pip install tensorrt-rtx; part of the test extra)")
SIZE_FLAGS = ["--min-size", "64", "--opt-size", "64", "--max-size", "128", "--max-batch", "2"]


@pytest.fixture(scope="module")
def fp16_artifact(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-fp16")
    net = cn.write_random_controlnet(tiny_model_dir, root / "net", seed=4)
    out = root / "engines"
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--precision", "fp16",
                 "--controlnet", str(net), "--json", *SIZE_FLAGS]) == 0
    return out, net


@pytest.mark.slow
def test_fp16_export_covers_the_controlnet_and_verify_passes(fp16_artifact, tiny_model_dir, capsys):
    out, net = fp16_artifact
    manifest = load_manifest(out)
    for name in ("controlnet_0", "unet_control"):
        record = manifest.component(name)
        assert record["precision"] == "fp16" and record["check_error"] <= 2e-2
    capsys.readouterr()
    code = main(["verify", "--model", str(tiny_model_dir), "--engines", str(out), "--steps", "2", "--width", "64",
                 "--height", "64", "--controlnet", str(net), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and not report["failed"] and report["precision"] == "fp16", report


@needs_rtx
@pytest.mark.slow
def test_build_engines_builds_controlnet_engines(fp16_artifact, tiny_model_dir, capsys):
    import tensorrt_rtx as trt

    out, _ = fp16_artifact
    capsys.readouterr()
    assert main(["build-engines", "--model", str(tiny_model_dir), "--out", str(out), "--backend", "tensorrt-rtx",
                 "--precision", "fp16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not summary.get("exported")  # same sizes and precision: the ControlNet export is reused
    manifest = load_manifest(out)
    assert {"controlnet_0", "unet_control"} <= set(summary["built"])
    for name in ("controlnet_0", "unet_control"):
        spec = manifest.specs[name]
        path, record = manifest.verified_engine("tensorrt-rtx", name)
        assert path.stat().st_size > 0 and record["version"] == trt.__version__
        assert record["profile"] == {k: [list(s) for s in v] for k, v in spec.profile(manifest.sizes).items()}
        assert {n: t["dtype"] for n, t in record["io"].items()} == {t.name: t.dtype for t in spec.tensors}
