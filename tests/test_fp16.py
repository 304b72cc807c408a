"""`sdrt export --precision fp16` on the tiny model: parity, overflow islands, graph types, runtime.

fp16 graphs are evaluated through ``fp16.emulate`` (fp32 compute, every fp16 tensor rounded), the
arithmetic of a strongly typed fp16 engine; ONNX Runtime's CPU kernels would hide fp16 overflow.
``test_fp16_torch.py`` runs the fp16 graphs themselves against torch fp32, per component and as images
against the diffusers pipeline, SD1.5 and SDXL.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sdrt.errors import InputError
from sdrt.manifest import load_manifest
from sdrt_export import fp16
from sdrt_export.checks import random_inputs, relative_error, run_torch
from sdrt_export.wrappers import load_component

FP16_BOUND = 1e-2  # relative L2 per component vs torch fp32 (measured 1.4e-3 .. 2.1e-3)
SHAPES = [(1, 64, 136), (2, 120, 136)]
# VAE decoder weights multiplied so the up-blocks' activations exceed 65504 (max ~2e5 at x30).
UP_BLOCK_WEIGHTS = re.compile(r"decoder\.up_blocks\.\d+\.(resnets\.\d+\.conv2|upsamplers\.0\.conv)\.(weight|bias)")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _convert(model: onnx.ModelProto, islands) -> onnx.ModelProto:
    chosen = fp16.select(model, islands)
    return fp16.to_fp16(onnx.ModelProto.FromString(model.SerializeToString()),
                        [name for names in chosen.values() for name in names])


@pytest.fixture(scope="module")
def fp16_dir(tiny_fp16_engine_dir):
    return tiny_fp16_engine_dir


@pytest.fixture(scope="module")
def emulated(fp16_dir):
    manifest = load_manifest(fp16_dir)
    return {spec.name: _session(fp16.emulate(onnx.load(str(manifest.verified_path(spec.name)))))
            for spec in manifest.specs}


def test_parity_with_torch(tiny_model_dir, fp16_dir, emulated):
    manifest = load_manifest(fp16_dir)
    rng = np.random.default_rng(99)
    worst = {}
    for spec in manifest.specs:
        module = load_component(tiny_model_dir, spec.name)
        for shape in SHAPES:
            arrays = random_inputs(spec, *shape, rng)
            want = run_torch(module, arrays)
            got = emulated[spec.name].run(spec.output_names, dict(zip(spec.input_names, arrays)))
            for name, g, w in zip(spec.output_names, got, want):
                assert g.shape == w.shape and g.dtype == np.float32
                worst[spec.name] = max(worst.get(spec.name, 0.0), relative_error(g, w))
        assert worst[spec.name] <= FP16_BOUND, (spec.name, worst[spec.name])
        assert manifest.component(spec.name)["check_error"] <= FP16_BOUND
    print("fp16 parity (max relative L2):", {k: f"{v:.2e}" for k, v in worst.items()})


def _extreme_feeds(rng, text_session) -> dict:
    """Inputs at the edges of real runs: 77-token prompts, latents to +-4 x init sigma (14.6)."""
    ids = rng.integers(1, 49000, size=(2, 77)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 49406, 49407
    latents = rng.uniform(-58.4, 58.4, size=(2, 4, 16, 17)).astype(np.float32)
    hidden = text_session.run(["last_hidden_state"], {"input_ids": ids})[0]
    return {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": latents, "timestep": np.array([999.0, 0.37], np.float32),
                 "encoder_hidden_states": hidden},
        "vae_decoder": {"latent": latents / np.float32(0.18215)},
        "vae_encoder": {"images": np.sign(rng.standard_normal((2, 3, 128, 136))).astype(np.float32)},
    }


def test_extremes_stay_finite(fp16_dir, emulated):
    manifest = load_manifest(fp16_dir)
    raw = {spec.name: _session(onnx.load(str(manifest.verified_path(spec.name)))) for spec in manifest.specs}
    feeds = _extreme_feeds(np.random.default_rng(5), emulated["text_encoder"])
    for spec in manifest.specs:
        for label, session in (("emulated", emulated[spec.name]), ("ort-cpu", raw[spec.name])):
            for name, out in zip(spec.output_names, session.run(spec.output_names, feeds[spec.name])):
                assert np.isfinite(out).all(), f"{label} {spec.name}.{name}"


def test_islands_stop_vae_overflow(tiny_engine_dir):
    """Scaled-up VAE decoder weights: a naive full-fp16 graph overflows to inf/NaN, ours stays finite
    and close to fp32 (random tiny weights alone never reach 65504)."""
    model = onnx.load(str(load_manifest(tiny_engine_dir).verified_path("vae_decoder")))
    for init in model.graph.initializer:
        if UP_BLOCK_WEIGHTS.search(init.name):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(30), init.name))
    feeds = {"latent": np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)}
    want = _session(model).run(None, feeds)[0]
    naive = _session(fp16.emulate(_convert(model, ()))).run(None, feeds)[0]
    ours = _session(fp16.emulate(_convert(model, fp16.islands_for("vae_decoder")))).run(None, feeds)[0]
    assert not np.isfinite(naive).all()
    assert np.isfinite(ours).all() and relative_error(ours, want) <= FP16_BOUND


def _island_nodes(fp32_dir: Path, component: str) -> dict[str, list[str]]:
    """Island node names, selected on the fp32 artifact's graph (same model, same node names)."""
    model = onnx.load(str(load_manifest(fp32_dir).verified_path(component)))
    return fp16.select(model, fp16.islands_for(component))


def test_manifest_records_islands(fp16_dir, tiny_engine_dir):
    manifest = load_manifest(fp16_dir)
    assert manifest.data["precision"] == "fp16"
    for spec in manifest.specs:
        entry = manifest.component(spec.name)
        assert entry["precision"] == "fp16"
        policy = {island.name: island.to_dict() for island in fp16.islands_for(spec.name)}
        applied = {island["name"]: island for island in entry["fp32_islands"]}
        assert set(applied) == set(policy), spec.name  # every island of the policy matched something
        chosen = _island_nodes(tiny_engine_dir, spec.name)
        for name, island in applied.items():
            assert {k: v for k, v in island.items() if k != "nodes"} == policy[name]
            assert island["nodes"] == len(chosen[name]) > 0, (spec.name, name)
    islands = {e["name"] for e in manifest.component("unet")["fp32_islands"]}
    assert {"timestep-embedding", "norm-reductions", "attention-softmax"} <= islands
    assert "vae-decoder-up-blocks" in {e["name"] for e in manifest.component("vae_decoder")["fp32_islands"]}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(model)
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def test_graph_is_fp16_with_fp32_islands(fp16_dir, tiny_engine_dir):
    manifest = load_manifest(fp16_dir)
    fp32, half = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for spec in manifest.specs:
        model = onnx.load(str(manifest.verified_path(spec.name)))
        types, producer = _types(model), {o: n for n in model.graph.node for o in n.output}
        for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
            assert [onnx.helper.tensor_dtype_to_np_dtype(types[v.name]).name for v in values] == \
                [t.dtype for t in tensors]  # I/O stays as the spec says
        weights = {w.name: w for w in model.graph.initializer if w.data_type in (fp32, half)}
        big = [w for w in weights.values() if np.prod(w.dims) >= 64]
        share = sum(w.data_type == half for w in big) / len(big)
        island_nodes = {n for names in _island_nodes(tiny_engine_dir, spec.name).values() for n in names}
        missing = island_nodes - {node.name for node in model.graph.node}
        assert all(re.search(r"/Cast(_\d+)?$", name) for name in missing), missing  # fp32 -> fp32 Casts go
        for node in model.graph.node:
            floats = [t for t in [*node.input, *node.output] if types.get(t) in (fp32, half)]
            if node.name in island_nodes:  # computes in fp32; fp16 values enter through a Cast to fp32
                assert all(types[t] == fp32 for t in floats), node.name
                for t in node.input:
                    source = producer.get(t)
                    if t in floats and source is not None and source.name not in island_nodes:
                        assert source.op_type == "Cast", (node.name, t)
            elif node.op_type in ("Conv", "MatMul", "Gemm"):
                assert types[node.output[0]] == half, node.name
        if spec.name == "vae_decoder":  # the split of older diffusers' upcast_vae
            for name, w in weights.items():
                if name.startswith("vae.decoder.up_blocks.") or name.startswith("vae.decoder.conv_out."):
                    assert w.data_type == fp32, name
                elif name.startswith(("vae.decoder.mid_block.", "vae.decoder.conv_in.", "vae.post_quant_conv.")):
                    assert w.data_type == half, name
        else:
            assert share >= 0.95, (spec.name, share)


def test_external_data_layout(tiny_engine_dir, tmp_path, monkeypatch):
    """Components over the protobuf limit: the fp16 file and the check's emulated graph use external data."""
    from sdrt_export import graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
    src = load_manifest(tiny_engine_dir).verified_path("text_encoder")
    files, record = fp16.convert(src, tmp_path / "text_encoder.onnx", fp16.islands_for("text_encoder"))
    assert files == ["text_encoder.onnx", "text_encoder.onnx.data"] and record["fp32_islands"]
    (tmp_path / "scratch").mkdir()
    session = fp16.emulated_session(tmp_path / files[0], tmp_path / "scratch")
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["emulated.onnx", "emulated.onnx.data"]
    ids = np.full((1, 77), 49407, np.int32)
    ids[0, 0] = 49406
    assert all(np.isfinite(out).all() for out in session.run(None, {"input_ids": ids}))


def test_bad_precision(tiny_model_dir, tmp_path):
    from sdrt_export.exporter import export_model

    with pytest.raises(InputError, match="precision 'fp8'"):
        export_model(tiny_model_dir, tmp_path / "engine", precision="fp8")
    assert not (tmp_path / "engine").exists()
