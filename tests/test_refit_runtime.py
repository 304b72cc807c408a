"""Run-time refit of TensorRT engines (``sdrt.backends.refit``) on the CPU, against a stand-in ``Refitter`` and
TensorRT (the real ones: test_refit_gpu.py): always base + deltas, A -> B -> A, back to base from the ONNX's
bytes (checked against the manifest), fused partners, failed refits, refusals naming the rebuild command, and
``open_engine`` giving a TensorRT engine its plan. Engine records are written here as ``sdrt build-engines
--refit`` writes them (test_refit.py checks that it does), around stand-in engine bytes."""

from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pytest

from sdrt.backends import open_engine
from sdrt.backends import refit as runtime
from sdrt.errors import ArtifactError, InputError
from sdrt.manifest import file_record, load_manifest
from sdrt.onnx_weights import initializer_locations
from sdrt_export import refit as refit_plan

BACKEND = "tensorrt"


def _artifact(tiny_engine_dir, out, refit: bool):
    """A copy of tiny_engine_dir with a recorded (stand-in) TensorRT unet engine, refittable or not."""
    shutil.copytree(tiny_engine_dir, out)
    manifest = load_manifest(out)
    assert manifest.component("unet").get("weight_map"), "sdrt export writes weight maps"
    (out / BACKEND).mkdir()
    (out / BACKEND / "unet.engine").write_bytes(b"fake engine")
    files = [f"{BACKEND}/unet.engine"]
    if refit:
        weights = refit_plan.targets(manifest, "unet")
        data = refit_plan.plan(manifest, BACKEND, "unet", weights, list(weights), [])
        files.append(refit_plan.save(manifest, BACKEND, "unet", weights, {"refit_marked": list(weights),
                                                                          "refit_unknown": []}))
        assert json.loads((out / files[1]).read_text()) == data
    profile = {k: [list(s) for s in v] for k, v in manifest.specs["unet"].profile(manifest.sizes).items()}
    data = json.loads((out / "manifest.json").read_text())
    data["engines"] = {BACKEND: {"command": "sdrt build-engines --backend tensorrt", "components": {"unet": {
        "files": [file_record(out, f) for f in files], "onnx_sha256": manifest.onnx_digest("unet"),
        "flavour": "tensorrt", "version": "10.99", "compute_capability": "8.9", "profile": profile,
        "refit": refit_plan.wanted(manifest, "unet", refit)}}}}
    (out / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(out)
    return manifest, runtime.load_plan(manifest, BACKEND, "unet", manifest.verified_engine(BACKEND, "unet")[1])


def _base(manifest, names) -> dict:
    path = manifest.verified_path("unet")
    locations = initializer_locations(path)
    return {n: np.array(locations[n].read(path.parent)) for n in names}


def test_non_refittable_engine_refuses_runtime_lora_naming_the_rebuild_command(tiny_engine_dir, tmp_path):
    manifest, plan = _artifact(tiny_engine_dir, tmp_path / "e", refit=False)
    engine = types.SimpleNamespace(path=tmp_path / "e" / BACKEND / "unet.engine", refit_plan=plan)
    with pytest.raises(InputError) as info:
        runtime.refit(engine, {"onnx::MatMul_1": np.zeros(1)})
    message = str(info.value)
    assert "\n" not in message and "is not refittable" in message
    assert f"`{manifest.rebuild_command(BACKEND)} --refit`" in message
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


def test_refit_is_always_base_plus_deltas_and_back_to_base_restores_base(tiny_engine_dir, tmp_path):
    manifest, plan = _artifact(tiny_engine_dir, tmp_path / "e", refit=True)
    assert plan.refittable and plan.weights
    engine, state = _fake_engine(plan)
    base = _base(manifest, plan.weights)
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


def test_base_weights_are_checked_against_the_manifest_before_use(tiny_engine_dir, tmp_path):
    out = tmp_path / "e"
    _, plan = _artifact(tiny_engine_dir, out, refit=True)
    engine, _ = _fake_engine(plan)
    name = sorted(engine.refit_plan.weights)[0]
    runtime.refit(engine, {name: np.zeros(engine.refit_plan.weights[name]["shape"], np.float32)})
    onnx_file = out / "unet.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        runtime.refit(engine, {})


def test_open_engine_gives_a_tensorrt_engine_its_plan_and_a_refit_drops_its_cuda_graphs(tiny_engine_dir, tmp_path,
                                                                                         monkeypatch):
    import sdrt.backends.tensorrt as trt_backend
    from sdrt.backends.cuda import GpuInfo
    from tests.test_tensorrt_runtime import FakeCuda, _expected, _feeds, fake_trt

    manifest, plan = _artifact(tiny_engine_dir, tmp_path / "e", refit=True)
    profile = manifest.verified_engine(BACKEND, "unet")[1]["profile"]
    cuda = FakeCuda()
    module = fake_trt(cuda, profile, [])
    module.Refitter, module.Weights = FakeRefitter, lambda array: types.SimpleNamespace(array=array)
    monkeypatch.setattr(trt_backend, "import_flavour", lambda backend: module)
    monkeypatch.setattr(trt_backend, "gpu_info", lambda: GpuInfo("Fake GPU", "8.9", 13000))
    monkeypatch.setattr(trt_backend, "_cuda", lambda: cuda)
    monkeypatch.setattr(trt_backend, "_ACTIVATIONS", trt_backend._Activations())
    engine = open_engine(manifest, "unet", BACKEND, cuda_graph=True)
    assert engine.refit_plan.refittable and engine.refit_plan.weights == plan.weights
    state = engine.engine
    state.weights, state.sets, state.refitters, state.partners, state.fail = {}, [], [], {}, False
    feeds = _feeds(1, 64)
    engine(feeds)
    assert len(cuda.graphs) == 1
    name = sorted(plan.weights)[0]
    base = _base(manifest, [name])[name]
    assert engine.refit({name: base + 1}) == [name] and state.sets == [[name]] and cuda.graphs == {}
    np.testing.assert_array_equal(state.weights[name], base + 1)
    np.testing.assert_array_equal(engine(feeds)["out_sample"], _expected(feeds))  # captured again
    assert len(cuda.graphs) == 1
    assert engine.refit({}) == [name]
    np.testing.assert_array_equal(state.weights[name], base)
