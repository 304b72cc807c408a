"""``sdrt build-engines`` on the CPU: TensorRT-RTX builds ahead of time without a GPU, so engines are built
and recorded here for real (running them needs a GPU: test_tensorrt_gpu.py). Covers the parsed networks
against the specs, atomic writes, the build cache, the trust checks that refuse an engine before
TensorRT deserializes it, and the ort-cpu optimized graphs."""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil

import numpy as np
import pytest

import sdrt.backends.tensorrt as trt_backend
from sdrt.backends import open_engine
from sdrt.backends.cuda import CudaError, GpuInfo, gpu_info
from sdrt.backends.ort import OrtEngine
from sdrt.cli import main
from sdrt.errors import ArtifactError, ExportError, InputError
from sdrt.manifest import load_manifest, sha256_file
from sdrt.specs import COMPONENTS, SizeRange
from sdrt_export import build_engines as be
from sdrt_export import trt_builder
from sdrt_export.checks import random_inputs

SIZES = SizeRange(min_size=64, opt_size=128, max_size=256, max_batch=2)  # = tiny_engine_dir's
RTX = "tensorrt-rtx"
needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="needs tensorrt_rtx (pip install tensorrt-rtx; part of the test extra)")


def _has_gpu() -> bool:
    try:
        gpu_info()
    except CudaError:
        return False
    return True


def _copy(src, dst):
    shutil.copytree(src, dst)  # copy2 keeps mtimes
    return dst


def _snapshot(root):
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tiny_model_dir, tiny_engine_dir, tmp_path_factory):
    """A copy of tiny_engine_dir with TensorRT-RTX engines (built once for this module). Copy before changing."""
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt_rtx (pip install tensorrt-rtx)")
    out = _copy(tiny_engine_dir, tmp_path_factory.mktemp("rtx") / "tiny")
    summary = be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False)
    return out, summary


@needs_rtx
def test_parsed_networks_and_profiles_match_the_specs(tiny_engine_dir):
    import tensorrt_rtx as trt

    manifest = load_manifest(tiny_engine_dir)
    for spec in manifest.specs:
        logger = trt_builder.make_logger(trt)
        builder = trt.Builder(logger)
        network, _parser = trt_builder.parse_network(trt, builder, logger, manifest.verified_path(spec.name))
        io = trt_builder.network_io(trt, network)
        assert [n for n, t in io.items() if t["mode"] == "input"] == spec.input_names
        assert [n for n, t in io.items() if t["mode"] == "output"] == spec.output_names
        for t in spec.tensors:
            assert io[t.name]["dtype"] == t.dtype
            assert io[t.name]["shape"] == [d if isinstance(d, int) else -1 for d in t.dims]
        held = trt_builder.add_profile(builder, builder.create_builder_config(), be.profile_for(spec, SIZES))
        assert held == {name: [list(s) for s in shapes] for name, shapes in spec.profile(SIZES).items()}


def test_static_profile_fixes_height_and_width(tiny_engine_dir):
    unet = load_manifest(tiny_engine_dir).specs["unet"]
    profile = be.profile_for(unet, SIZES, be.parse_static("96x64"))
    assert profile["sample"] == [[1, 4, 8, 12], [2, 4, 8, 12], [4, 4, 8, 12]]
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        be.parse_static("96")


@needs_rtx
def test_engines_are_recorded_with_what_they_depend_on(built):
    import tensorrt_rtx as trt

    out, summary = built
    assert sorted(summary["built"]) == sorted(COMPONENTS) and not summary["cached"]
    manifest = load_manifest(out)
    section = manifest.engines(RTX)
    command = section["command"]
    assert command.startswith("sdrt build-engines --model ") and "--backend tensorrt-rtx" in command
    for spec in manifest.specs:
        record = section["components"][spec.name]
        assert (record["flavour"], record["version"]) == ("tensorrt_rtx", trt.__version__)
        assert record["targets"] == trt_builder.DEFAULT_TARGETS
        assert record["onnx_sha256"] == manifest.onnx_digest(spec.name)
        assert record["profile"] == {k: [list(s) for s in v] for k, v in spec.profile(SIZES).items()}
        assert {n: t["dtype"] for n, t in record["io"].items()} == {t.name: t.dtype for t in spec.tensors}
        path, _ = manifest.verified_engine(RTX, spec.name)
        assert path == out / RTX / f"{spec.name}.engine" and sha256_file(path) == record["files"][0]["sha256"]
    assert sorted(p.name for p in (out / RTX).iterdir()) == sorted(f"{c}.engine" for c in COMPONENTS)


@needs_rtx
def test_second_build_is_a_no_op(built, tiny_model_dir, tmp_path):
    out = _copy(built[0], tmp_path / "e")
    before = _snapshot(out)
    summary = be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False)
    assert summary["built"] == [] and sorted(summary["cached"]) == sorted(COMPONENTS)
    assert "up to date" in summary["message"] and "nothing to build" in summary["message"]
    assert _snapshot(out) == before  # not even the manifest was rewritten


@needs_rtx
def test_failed_engine_write_leaves_no_partial_file_and_manifest_unchanged(tiny_model_dir, tiny_engine_dir,
                                                                            tmp_path, monkeypatch):
    out = _copy(tiny_engine_dir, tmp_path / "e")
    manifest_before = (out / "manifest.json").read_bytes()

    def disk_full(handle, data):
        handle.write(memoryview(data)[: len(memoryview(data)) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(be, "_write_all", disk_full)
    with pytest.raises(ExportError, match="No space left on device"):
        be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False)
    assert list((out / RTX).iterdir()) == []
    assert (out / "manifest.json").read_bytes() == manifest_before


@needs_rtx
def test_failure_mid_build_keeps_finished_engines_only(tiny_model_dir, tiny_engine_dir, tmp_path, monkeypatch):
    out = _copy(tiny_engine_dir, tmp_path / "e")
    real = trt_builder.build_serialized
    calls = []

    def fail_on_unet(builder, network, config):
        calls.append(network.get_input(0).name)
        return None if network.get_input(0).name == "sample" else real(builder, network, config)

    monkeypatch.setattr(trt_builder, "build_serialized", fail_on_unet)
    with pytest.raises(ExportError, match="unet: TensorRT-RTX build failed"):
        be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False)
    assert calls == ["input_ids", "sample"]
    assert sorted(p.name for p in (out / RTX).iterdir()) == ["text_encoder.engine"]
    assert list(load_manifest(out).engines(RTX)["components"]) == ["text_encoder"]


@needs_rtx
def test_tampered_engine_is_refused_before_deserializing_and_rebuilt_alone(built, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    out = _copy(built[0], tmp_path / "e")
    engine = out / RTX / "vae_encoder.engine"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    monkeypatch.setattr(trt_backend, "_deserialize", lambda *a: pytest.fail("deserialized a tampered engine"))
    manifest = load_manifest(out)
    with pytest.raises(ArtifactError, match="does not match its sha256") as info:
        open_engine(manifest, "vae_encoder", RTX)
    assert f"`{manifest.rebuild_command(RTX)}`" in str(info.value)

    summary = be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False)
    assert summary["built"] == ["vae_encoder"] and len(summary["cached"]) == 3
    load_manifest(out).verified_engine(RTX, "vae_encoder")


@needs_rtx
def test_engine_from_another_tensorrt_version_is_refused_with_the_rebuild_command(built, tmp_path, monkeypatch):
    out = _copy(built[0], tmp_path / "e")
    data = json.loads((out / "manifest.json").read_text())
    data["engines"][RTX]["components"]["unet"]["version"] = "1.0.0.0"
    (out / "manifest.json").write_text(json.dumps(data))
    monkeypatch.setattr(trt_backend, "_deserialize", lambda *a: pytest.fail("deserialized a mismatched engine"))
    manifest = load_manifest(out)
    with pytest.raises(ArtifactError, match="built with tensorrt_rtx 1.0.0.0") as info:
        open_engine(manifest, "unet", RTX)
    command = manifest.rebuild_command(RTX)
    assert f"rebuild with `{command}`" in str(info.value) and command == data["engines"][RTX]["command"]


@needs_rtx
def test_gpu_checks_come_before_deserializing(built, tmp_path, monkeypatch):
    out = _copy(built[0], tmp_path / "e")
    monkeypatch.setattr(trt_backend, "_deserialize", lambda *a: pytest.fail("deserialized without checking the GPU"))
    if not _has_gpu():
        with pytest.raises(InputError, match="needs an NVIDIA GPU"):
            open_engine(load_manifest(out), "unet", RTX)
    data = json.loads((out / "manifest.json").read_text())
    data["engines"][RTX]["components"]["unet"]["targets"] = ["SM86"]
    (out / "manifest.json").write_text(json.dumps(data))
    monkeypatch.setattr(trt_backend, "gpu_info", lambda: GpuInfo("Test GPU", "8.9", 13000))
    with pytest.raises(ArtifactError, match="built for sm86, this Test GPU is sm89"):
        open_engine(load_manifest(out), "unet", RTX)


def test_tensorrt_backend_without_gpu_says_so_in_one_line(tiny_model_dir, tmp_path, capsys):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    code = main(["build-engines", "--model", str(tiny_model_dir), "--out", str(tmp_path / "e"),
                 "--backend", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "there is none" in err and "--backend tensorrt-rtx" in err
    assert not (tmp_path / "e").exists()


def test_ort_cpu_build_exports_first_and_writes_optimized_graphs_with_the_same_outputs(tiny_model_dir, tmp_path):
    out = tmp_path / "new"
    summary = be.build_engines(tiny_model_dir, out, "ort-cpu", sizes=SIZES, progress=False)
    assert summary["exported"] == "it has no ONNX export yet" and sorted(summary["built"]) == sorted(COMPONENTS)
    manifest = load_manifest(out)
    rng = np.random.default_rng(0)
    for spec in manifest.specs:
        record = manifest.engines("ort-cpu")["components"][spec.name]
        assert record["optimization_level"] == "ORT_ENABLE_EXTENDED" and record["providers"] == ["CPUExecutionProvider"]
        path, _ = manifest.verified_engine("ort-cpu", spec.name)
        assert path.read_bytes() != manifest.verified_path(spec.name).read_bytes()
        feeds = dict(zip(spec.input_names, random_inputs(spec, 2, 64, 96, rng)))
        optimized, plain = open_engine(manifest, spec.name, "ort-cpu")(feeds), OrtEngine(
            manifest.verified_path(spec.name), spec)(feeds)
        for name in spec.output_names:
            np.testing.assert_allclose(optimized[name], plain[name], rtol=1e-4, atol=1e-5)
    again = be.build_engines(tiny_model_dir, out, "ort-cpu", progress=False)  # sizes: the artifact's
    assert again["built"] == [] and again["exported"] is None
