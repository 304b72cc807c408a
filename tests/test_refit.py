"""``sdrt build-engines --refit`` and run-time LoRA refits of TensorRT engines (``sdrt_export.refit``,
``sdrt.backends.refit``).

On the CPU: the refit plan from the real TensorRT-RTX network parsed from the tiny model's ONNX (which
initializers, their TensorRT names, consistent with the ONNX), the flag and marks the builder gets, the
records, plans and rebuild rules, the refusals, and the refit bookkeeping (base + deltas, back to base)
against a stand-in ``Refitter``. TensorRT-RTX 1.7 loads the CUDA driver to build a refittable engine, so the
real refittable build and the refit itself run in test_refit_gpu.py (skips, saying why, elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import types

import numpy as np
import pytest

from sdrt.backends import refit as runtime
from sdrt.cli import main
from sdrt.errors import ArtifactError, ExportError, InputError
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


@needs_rtx
def test_non_refittable_engine_refuses_runtime_lora_naming_the_rebuild_command(mapped, tiny_model_dir, tmp_path,
                                                                               fake_build):
    out = _copy(mapped, tmp_path / "e")
    be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False)
    manifest = load_manifest(out)
    _, record = manifest.verified_engine(RTX, "unet")
    plan = runtime.load_plan(manifest, RTX, "unet", record)
    engine = types.SimpleNamespace(path=out / RTX / "unet.engine", refit_plan=plan)
    with pytest.raises(InputError) as info:
        runtime.refit(engine, {"onnx::MatMul_1": np.zeros(1)})
    message = str(info.value)
    assert "\n" not in message and "is not refittable" in message
    assert f"`{manifest.rebuild_command(RTX)} --refit`" in message
    assert runtime.refit(engine, {}) == []  # no LoRA: nothing to refit, nothing refused


class FakeRefitter:
    """Stands in for ``trt.Refitter``: keeps what was set, applies it on ``refit_cuda_engine``."""

    def __init__(self, engine, logger):
        self.engine, self.pending, self.partners, self.fail = engine, {}, engine.partners, False
        engine.refitters.append(self)

    def set_named_weights(self, name, weights):
        self.pending[name] = np.array(weights.array)
        return True

    def get_missing_weights(self):
        return [p for n, p in self.partners.items() if n in self.pending and p not in self.pending]

    def refit_cuda_engine(self):
        if self.engine.fail:
            return False
        self.engine.sets.append(sorted(self.pending))
        self.engine.weights.update(self.pending)
        self.pending = {}
        return True


def _fake_engine(plan):
    trt = types.SimpleNamespace(Refitter=FakeRefitter, Logger=lambda level: None, WARNING=2,
                                Weights=lambda array: types.SimpleNamespace(array=array))
    trt.Logger.WARNING = 2
    state = types.SimpleNamespace(weights={}, sets=[], refitters=[], partners={}, fail=False, drops=0, syncs=0)
    engine = types.SimpleNamespace(trt=trt, path="unet.engine", refit_plan=plan, engine=state,
                                   cuda=types.SimpleNamespace(synchronize=lambda: setattr(state, "syncs",
                                                                                          state.syncs + 1)))
    engine._drop_graphs = lambda: setattr(state, "drops", state.drops + 1)
    return engine, state


@needs_rtx
def test_refit_is_always_base_plus_deltas_and_back_to_base_restores_base(mapped, tiny_model_dir, tmp_path,
                                                                         fake_build):
    out = _copy(mapped, tmp_path / "e")
    be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False, refit=True)
    manifest = load_manifest(out)
    plan = runtime.load_plan(manifest, RTX, "unet", manifest.verified_engine(RTX, "unet")[1])
    assert plan.refittable and plan.weights
    engine, state = _fake_engine(plan)
    initializers = _initializers(manifest.verified_path("unet"))
    base = {n: numpy_helper.to_array(initializers[n]) for n in plan.weights}
    w1, w2, w3 = sorted(plan.weights)[:3]
    lora_a = {w1: base[w1] + 1, w2: base[w2] * 2}
    lora_b = {w2: base[w2] - 3, w3: base[w3] + 0.5}

    assert runtime.refit(engine, lora_a) == sorted([w1, w2])
    assert runtime.refit(engine, lora_a) == [] and len(state.sets) == 1  # the set in use: nothing to do
    assert runtime.refit(engine, lora_b) == sorted([w1, w2, w3])  # w1 back to base
    np.testing.assert_array_equal(state.weights[w1], base[w1])
    np.testing.assert_array_equal(state.weights[w2], lora_b[w2])
    assert runtime.refit(engine, lora_a) == sorted([w1, w2, w3])  # A again: w3 back to base
    for name in (w1, w2):
        np.testing.assert_array_equal(state.weights[name], lora_a[name])
    np.testing.assert_array_equal(state.weights[w3], base[w3])
    assert runtime.refit(engine, {}) == sorted([w1, w2])  # no LoRA: the base engine
    for name in (w1, w2, w3):
        np.testing.assert_array_equal(state.weights[name], base[name])
    assert runtime.refit(engine, {}) == [] and len(state.sets) == 4 and state.drops == 4 and state.syncs == 4

    state.partners = {w1: w3}  # TensorRT wants w3 refitted with w1: w3 gets its current value
    runtime.refit(engine, lora_b)
    runtime.refit(engine, {w1: lora_a[w1], w2: lora_b[w2], w3: lora_b[w3]})
    assert state.sets[-1] == sorted([w1, w2, w3])
    state.weights.clear()
    runtime.refit(engine, {w1: base[w1] + 7})  # w2 and w3 to base; w3 also asked for as w1's partner
    np.testing.assert_array_equal(state.weights[w3], base[w3])

    state.fail = True
    with pytest.raises(ArtifactError, match="could not refit"):
        runtime.refit(engine, lora_a)
    state.fail = False
    refitters = len(state.refitters)
    runtime.refit(engine, {})  # after a failed refit every weight it set goes back to base
    assert len(state.refitters) == refitters + 1 and state.sets[-1] == sorted({w1, w2, w3} | set(lora_a))
    for name in (w1, w2, w3):
        np.testing.assert_array_equal(state.weights[name], base[name])
    with pytest.raises(InputError, match=r"in the engine, the new weights are \[1\]"):
        runtime.refit(engine, {w1: np.zeros(1, np.float32)})
    plan.not_refittable["folded"] = "no weights of this name in the parsed TensorRT network"
    with pytest.raises(InputError, match="cannot refit 1 weight"):
        runtime.refit(engine, {"folded": np.zeros(1)})


@needs_rtx
def test_base_weights_are_checked_against_the_manifest_before_use(mapped, tiny_model_dir, tmp_path, fake_build):
    out = _copy(mapped, tmp_path / "e")
    be.build_engines(tiny_model_dir, out, RTX, sizes=SIZES, progress=False, refit=True)
    manifest = load_manifest(out)
    engine, _ = _fake_engine(runtime.load_plan(manifest, RTX, "unet", manifest.verified_engine(RTX, "unet")[1]))
    name = sorted(engine.refit_plan.weights)[0]
    runtime.refit(engine, {name: np.zeros(engine.refit_plan.weights[name]["shape"], np.float32)})
    onnx_file = out / "unet.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        runtime.refit(engine, {})
