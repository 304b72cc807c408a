"""``sdrt build-engines --refit`` and run-time LoRA refits of TensorRT engines (``sdrt_export.refit``,
``sdrt.backends.refit``).

On the CPU: the refit plan from the real TensorRT-RTX network parsed from the tiny model's ONNX (which
initializers, their TensorRT names, consistent with the ONNX), the flag and marks the builder gets, the
records, plans and rebuild rules and the refusals (the run-time side: test_refit_runtime.py). TensorRT-RTX 1.7 loads the CUDA driver to build a refittable engine, so the
real refittable build and the refit itself run in test_refit_gpu.py (skips, saying why, elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from sdrt.cli import main
from sdrt.errors import ExportError
from sdrt.manifest import file_record, load_manifest
from sdrt.specs import COMPONENTS, SizeRange
from sdrt_export import build_engines as be
from sdrt_export import refit as refit_plan
from sdrt_export import trt_builder

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

SIZES = SizeRange(min_size=64, opt_size=128, max_size=256, max_batch=2)  # = tiny_engine_dir's
RTX = "tensorrt-rtx"
LORA = ("text_encoder", "unet")  # the tiny model's components with weight maps
needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="needs tensorrt_rtx (pip install tensorrt-rtx; part of the test extra)")


def _initializers(path) -> dict:
    return {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def add_weight_maps(out) -> None:
    """Give ``out`` weight maps in ``sdrt.lora``'s format where its export wrote none: every float
    initializer of rank >= 2 (what Linear/Conv weights become) under a made-up torch name, with where its
    raw bytes lie in the ONNX file."""
    data = json.loads((out / "manifest.json").read_text())
    for component in LORA:
        entry = data["components"][component]
        if entry.get("weight_map"):
            continue
        path = out / entry["files"][0]["path"]
        raw, mapping = path.read_bytes(), {}
        for name, init in _initializers(path).items():
            if init.data_type in (1, 10) and len(init.dims) >= 2 and init.raw_data:
                array = numpy_helper.to_array(init)
                mapping[f"torch.{name}.weight"] = {
                    "initializer": name, "transpose": False, "shape": list(array.shape), "dtype": array.dtype.name,
                    "file": path.name, "offset": raw.find(init.raw_data)}
        (out / f"{component}.weights.json").write_text(json.dumps(mapping))
        entry["weight_map"] = file_record(out, f"{component}.weights.json")
    (out / "manifest.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def mapped(tiny_engine_dir, tmp_path_factory):
    """A copy of tiny_engine_dir with weight maps for text_encoder and unet. Copy before changing."""
    out = tmp_path_factory.mktemp("refit") / "tiny"
    shutil.copytree(tiny_engine_dir, out)
    add_weight_maps(out)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _has_driver() -> bool:
    return refit_plan.has_cuda_driver()


@needs_rtx
def test_plan_names_exactly_the_weight_map_initializers_consistent_with_the_onnx(mapped):
    import tensorrt_rtx as trt

    manifest = load_manifest(mapped)
    for component in LORA:
        weight_map, _ = refit_plan.weight_map(manifest, component)
        targets = refit_plan.targets(manifest, component)
        onnx_path = manifest.verified_path(component)
        shape_constant = "/an/initializer/the/parser/folded"  # a name the network holds no weights of
        logger = trt_builder.make_logger(trt)
        builder = trt.Builder(logger)
        network, _parser = trt_builder.parse_network(trt, builder, logger, onnx_path)
        config = builder.create_builder_config()
        marked, unknown = refit_plan.mark(trt, network, config, [*targets, shape_constant])
        assert config.get_flag(trt.BuilderFlag.REFIT_INDIVIDUAL) and not config.get_flag(trt.BuilderFlag.REFIT)
        assert unknown == [shape_constant]
        plan = refit_plan.plan(manifest, RTX, component, {**targets, shape_constant: {}}, marked, unknown)
        assert set(plan["weights"]) == {e["initializer"] for e in weight_map.values()}
        assert list(plan["not_refittable"]) == [shape_constant]
        initializers = _initializers(onnx_path)
        for name, entry in plan["weights"].items():
            assert network.are_weights_marked_refittable(name) and entry["trt_name"] == name
            reference = numpy_helper.to_array(initializers[name])
            assert entry["shape"] == list(reference.shape) and entry["dtype"] == reference.dtype.name
            assert entry["params"] == sorted(p for p, e in weight_map.items() if e["initializer"] == name)
            base = np.memmap(mapped / entry["file"], entry["dtype"], "r", entry["offset"], tuple(entry["shape"]))
            np.testing.assert_array_equal(base, reference)
        biases = [n for n, i in initializers.items() if n.endswith(".bias")]
        assert biases and not any(network.are_weights_marked_refittable(n) for n in biases)


@pytest.fixture()
def fake_build(monkeypatch):
    """Replace TensorRT's final build call (TensorRT-RTX 1.7 needs a CUDA driver for refittable builds):
    record the real network and config it gets, return stand-in engine bytes."""
    import tensorrt_rtx as trt

    calls = {}

    def build(builder, network, config):
        name = network.get_input(0).name
        calls[name] = {"individual": config.get_flag(trt.BuilderFlag.REFIT_INDIVIDUAL),
                       "refit": config.get_flag(trt.BuilderFlag.REFIT), "network": network}
        return f"engine of {name}".encode()

    monkeypatch.setattr(trt_builder, "build_serialized", build)
    return calls


@needs_rtx
def test_refit_build_sets_the_flag_and_records_plans_and_rebuild_rules(mapped, tiny_model_dir, tmp_path, fake_build):
    out = _copy(mapped, tmp_path / "e")
    summary = be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False, refit=True)
    assert sorted(summary["built"]) == sorted(COMPONENTS)
    manifest = load_manifest(out)
    section = manifest.engines(RTX)
    assert section["refit"] is True and section["command"].endswith(" --refit")
    for component in COMPONENTS:
        record = section["components"][component]
        inputs = manifest.specs[component].input_names[0]
        if component not in LORA:
            assert record["refit"] is None and len(record["files"]) == 1
            assert not fake_build[inputs]["individual"]
            continue
        weight_map = manifest.component(component)["weight_map"]
        assert record["refit"] == {"flag": "REFIT_INDIVIDUAL", "weight_map_sha256": weight_map["sha256"]}
        assert fake_build[inputs]["individual"] and not fake_build[inputs]["refit"]
        assert [f["path"] for f in record["files"]] == [f"{RTX}/{component}.engine", f"{RTX}/{component}.refit.json"]
        plan = json.loads((out / record["files"][1]["path"]).read_text())
        names = {e["initializer"] for e in refit_plan.weight_map(manifest, component)[0].values()}
        assert set(plan["weights"]) == names and plan["not_refittable"] == {}
        assert record["refit_weights"] == len(names) and record["refit_not_refittable"] == 0
        assert plan["onnx_sha256"] == manifest.onnx_digest(component) == record["onnx_sha256"]
        network = fake_build[inputs]["network"]
        assert all(network.are_weights_marked_refittable(n) for n in names)
        manifest.verified_engine(RTX, component)  # the plan is checked with the engine

    fake_build.clear()
    again = be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False, refit=True)
    assert again["built"] == [] and not fake_build
    plain = be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False)
    assert sorted(plain["built"]) == sorted(LORA)  # refittable engines become plain ones, the VAE stays
    records = load_manifest(out).engines(RTX)["components"]
    assert all(records[c]["refit"] is None and len(records[c]["files"]) == 1 for c in COMPONENTS)
    assert not load_manifest(out).engines(RTX)["command"].endswith("--refit")


@needs_rtx
def test_refittable_build_without_a_cuda_driver_fails_in_one_line_and_writes_nothing(mapped, tiny_model_dir,
                                                                                     tmp_path):
    if _has_driver():
        pytest.skip("this machine has a CUDA driver: the GPU test below builds refittable engines for real")
    out = _copy(mapped, tmp_path / "e")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ExportError) as info:
        be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False, refit=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith("text_encoder: TensorRT-RTX build failed")
    assert "needs the CUDA driver (libcuda.so.1) to build refittable engines" in message
    assert list((out / RTX).iterdir()) == [] and (out / "manifest.json").read_bytes() == before


def test_refit_is_refused_for_ort_backends_and_artifacts_without_weight_maps(tiny_model_dir, tiny_engine_dir,
                                                                             tmp_path, capsys):
    args = ["build-engines", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--refit"]
    assert main([*args, "--backend", "ort-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--refit is for --backend tensorrt or tensorrt-rtx" in err
    if importlib.util.find_spec("tensorrt_rtx") is None:
        return
    out = _copy(tiny_engine_dir, tmp_path / "old")
    data = json.loads((out / "manifest.json").read_text())
    for entry in data["components"].values():
        entry.pop("weight_map", None)  # as an artifact exported before run-time LoRA
    (out / "manifest.json").write_text(json.dumps(data))
    args[4] = str(out)
    assert main([*args, "--backend", RTX]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no weight maps" in err and "sdrt export --force" in err
    assert not (out / RTX).exists()
