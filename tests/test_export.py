"""`sdrt export` on the tiny random-weight model: parity, I/O vs specs, manifest, errors, atomicity."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdrt.cli import main
from sdrt.errors import ArtifactError
from sdrt.lora import MAPPED_COMPONENTS as MAPPED  # components with a weight map (test_lora.py)
from sdrt.manifest import FORMAT_VERSION, load_manifest
from sdrt.specs import COMPONENTS, build_specs

TOLERANCE = 1e-5
# (batch, height, width) inside the fixture's 64..256 range: non-square batch 1, square batch 2, and a
# size whose latent (15x17) the 2-level tiny UNet cannot halve evenly.
SHAPES = [(1, 64, 136), (2, 128, 128), (2, 120, 136)]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def _torch_reference(model_dir: Path):
    """Reference callables straight from diffusers/transformers (not the exporter's wrappers)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()

    def text_encoder(input_ids):
        out = text(input_ids=input_ids.long())
        return out.last_hidden_state, out.pooler_output

    def encoder(images):
        dist = vae.encode(images).latent_dist
        return dist.mean, dist.logvar

    return {
        "text_encoder": text_encoder,
        "unet": lambda sample, timestep, ehs: (unet(sample, timestep, encoder_hidden_states=ehs).sample,),
        "vae_decoder": lambda latent: (vae.decode(latent).sample,),
        "vae_encoder": encoder,
    }


def _inputs(spec, batch, height, width, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for t in spec.inputs:
        shape = t.shape(batch, height, width, spec.scale)
        if t.dtype == "int32":
            ids = rng.integers(1, 49000, size=shape)
            ids[:, 0] = 49406
            ids[np.arange(shape[0]), rng.integers(2, shape[1], size=shape[0])] = 49407  # EOS: CLIP pools there
            feeds[t.name] = ids.astype(np.int32)
        elif t.name == "timestep":
            feeds[t.name] = rng.uniform(1, 999, size=shape).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _fake_model(tmp_path: Path, model_dir: Path, *, index: dict | None = None, unet: dict | None = None,
                drop: str | None = None) -> Path:
    """A pipeline folder linking the tiny model's parts, with model_index/unet config overridden."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for part in model_dir.iterdir():
        if part.name != drop and part.name not in ("model_index.json", "unet"):
            (fake / part.name).symlink_to(part)
    data = json.loads((model_dir / "model_index.json").read_text())
    (fake / "model_index.json").write_text(json.dumps({**data, **(index or {})}))
    if drop != "unet":
        (fake / "unet").mkdir()
        config = json.loads((model_dir / "unet" / "config.json").read_text())
        (fake / "unet" / "config.json").write_text(json.dumps({**config, **(unet or {})}))
    return fake


def _export_args(model, out, *extra):
    return ["export", "--model", str(model), "--out", str(out), "--min-size", "64", "--max-size", "128",
            "--max-batch", "1", "--json", *extra]


# --- the shared export -------------------------------------------------------------------------------

def test_parity_with_torch(tiny_model_dir, tiny_engine_dir):
    manifest = load_manifest(tiny_engine_dir)
    refs = _torch_reference(tiny_model_dir)
    rng = np.random.default_rng(1234)
    worst = {}
    for spec in manifest.specs:
        session = _session(manifest.verified_path(spec.name))
        for batch, height, width in SHAPES:
            feeds = _inputs(spec, batch, height, width, rng)
            with torch.no_grad():
                want = [w.numpy() for w in refs[spec.name](*[torch.from_numpy(feeds[n]) for n in spec.input_names])]
            got = session.run(spec.output_names, feeds)
            for name, g, w in zip(spec.output_names, got, want):
                assert g.shape == spec.shapes(batch, height, width)[name]
                assert g.shape == spec.output_shapes({n: v.shape for n, v in feeds.items()})[name]
                err = _rel(g, w)
                worst[spec.name] = max(worst.get(spec.name, 0.0), err)
                assert err <= TOLERANCE, f"{spec.name}.{name} at {(batch, height, width)}: {err:.3g}"
    print("parity (max relative L2 over shapes):", {k: f"{v:.2e}" for k, v in worst.items()})


def test_onnx_io_matches_specs(tiny_engine_dir):
    manifest = load_manifest(tiny_engine_dir)
    for spec in manifest.specs:
        model = onnx.load(str(manifest.verified_path(spec.name)), load_external_data=False)
        for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
            assert [v.name for v in values] == [t.name for t in tensors]
            for v, t in zip(values, tensors):
                tt = v.type.tensor_type
                assert onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) == np.dtype(t.dtype), v.name
                dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim)
                assert dims == tuple(t.dims), v.name
        entry = manifest.component(spec.name)
        assert entry["inputs"] == spec.input_names and entry["outputs"] == spec.output_names
        assert {k: [list(p) for p in v] for k, v in spec.profile(manifest.sizes).items()} == entry["profile"]


def test_manifest_round_trip_and_tamper(tiny_model_dir, tiny_engine_dir, tmp_path):
    manifest = load_manifest(tiny_engine_dir)
    data = manifest.data
    assert data["format_version"] == FORMAT_VERSION and data["family"] == "sd15"
    assert data["precision"] == "fp32" and data["exporter"] in ("legacy", "dynamo")
    assert 17 <= data["opset"] <= 20
    assert manifest.sizes.to_dict() == {"min_size": 64, "opt_size": 128, "max_size": 256, "max_batch": 2}
    assert manifest.dims.cross_attention_dim == 32 and manifest.dims.vae_scale_factor == 8
    assert set(data["components"]) == set(COMPONENTS)
    assert manifest.scheduler_config == json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert manifest.vae_scaling_factor == pytest.approx(0.18215)
    assert len(data["source"]["sha256"]) == 64 and {"torch", "diffusers"} <= set(data["versions"])
    tokenizer_files = {r["path"] for r in data["tokenizer"]["files"]}
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer.json"} <= tokenizer_files
    for record in data["tokenizer"]["files"]:
        manifest.check_file(record)
    listed = {r["path"] for e in data["components"].values() for r in e["files"]} | tokenizer_files
    listed |= {r["path"] for section in data.get("engines", {}).values()  # the CPU-native graphs
               for e in section["components"].values() for r in e["files"]}
    on_disk = {p.relative_to(tiny_engine_dir).as_posix() for p in tiny_engine_dir.rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.json"}

    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine_dir, copy)
    target = copy / "vae_encoder.onnx"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    tampered = load_manifest(copy)
    tampered.verified_path("unet")
    with pytest.raises(ArtifactError, match="sha256"):
        tampered.verified_path("vae_encoder")


# --- errors: exit 2, one line on stderr, nothing left behind --------------------------------------------

BAD_MODELS = {
    "missing": (None, "does not exist"),
    "no_index": ({"drop": "model_index.json"}, "not a Stable Diffusion pipeline"),
    "no_scheduler": ({"drop": "scheduler"}, "not a Stable Diffusion pipeline"),
    "sdxl": ({"index": {"_class_name": "StableDiffusionXLPipeline"}}, "StableDiffusionXLPipeline.*supported"),
    "unet_sdxl": ({"unet": {"addition_embed_type": "text_time"}}, "unsupported architecture.*supported"),
    "unet_cross": ({"unet": {"cross_attention_dim": 48}}, "cross_attention_dim 48"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_errors(case, tiny_model_dir, tmp_path, capsys):
    options, message = BAD_MODELS[case]
    if options is None:
        model = tmp_path / "nope"
    elif options.get("drop") == "model_index.json":
        model = tmp_path / "plain"
        model.mkdir()
        (model / "unet").mkdir()
    else:
        model = _fake_model(tmp_path, tiny_model_dir, **options)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    assert main(_export_args(model, out_parent / "engine")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    _no_leftovers(out_parent, "engine")


@pytest.mark.parametrize("extra, message", [
    (["--min-size", "100"], "multiple of 8"),
    (["--min-size", "256", "--max-size", "128"], "larger than"),
    (["--opset", "99"], "opset 99"),
])
def test_bad_options(extra, message, tiny_model_dir, tmp_path, capsys):
    assert main(_export_args(tiny_model_dir, tmp_path / "engine", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    _no_leftovers(tmp_path, "engine")


def test_out_exists_and_unwritable(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "keep").write_text("x")
    assert main(_export_args(tiny_model_dir, tmp_path / "engine")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err and "--force" in err
    assert (tmp_path / "engine" / "keep").read_text() == "x"

    blocker = tmp_path / "file"  # an OSError root cannot bypass: the parent is a regular file
    blocker.write_text("x")
    assert main(_export_args(tiny_model_dir, blocker / "engine")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write" in err

    if os.geteuid() != 0:  # permission denied (root ignores directory modes)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(_export_args(tiny_model_dir, locked / "engine")) == 2
        assert "Permission denied" in capsys.readouterr().err
        locked.chmod(0o755)


def test_failures_leave_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from sdrt_export import exporter, graph

    real_export = exporter.torch_export

    def fail_on(name, exc):
        def fake(module, spec, *args, **kwargs):
            if spec.name == name:
                raise exc
            return real_export(module, spec, *args, **kwargs)
        return fake

    monkeypatch.setattr(exporter, "torch_export", fail_on("unet", RuntimeError("injected\nsecond line")))
    assert main(_export_args(tiny_model_dir, tmp_path / "nested" / "engine")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unet" in err and "injected" in err
    assert not (tmp_path / "nested").exists()  # parents we created are removed too

    monkeypatch.setattr(exporter, "torch_export", fail_on("unet", KeyboardInterrupt()))
    assert main(_export_args(tiny_model_dir, tmp_path / "engine")) == 130
    assert "interrupted" in capsys.readouterr().err
    _no_leftovers(tmp_path, "engine")

    monkeypatch.setattr(exporter, "torch_export", real_export)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(graph, "save", disk_full)
    assert main(_export_args(tiny_model_dir, tmp_path / "engine")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    _no_leftovers(tmp_path, "engine")


def test_force_replaces_with_external_data(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from sdrt_export import exporter, graph

    out = tmp_path / "engine"
    out.mkdir()
    (out / "old").write_text("x")

    def boom(module, spec, *args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(exporter, "torch_export", boom)  # a failed --force export keeps the old dir
    assert main(_export_args(tiny_model_dir, out, "--force")) == 2
    assert (out / "old").is_file()
    capsys.readouterr()

    monkeypatch.undo()
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)  # exercise the >2 GB layout on a tiny model
    assert main(_export_args(tiny_model_dir, out, "--force")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not (out / "old").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]
    manifest = load_manifest(out)
    assert manifest.sizes.max_size == 128 and manifest.sizes.max_batch == 1
    specs = build_specs(manifest.dims)
    for name in COMPONENTS:
        files = [r["path"] for r in manifest.component(name)["files"]]
        assert files == [f"{name}.onnx", f"{name}.onnx.data"] + ([f"{name}.weights.json"] if name in MAPPED else [])
        assert summary["components"][name]["check_error"] <= TOLERANCE
        session = _session(manifest.verified_path(name))  # loads the external data file
        feeds = _inputs(specs[name], 1, 64, 72, np.random.default_rng(0))
        assert all(np.isfinite(o).all() for o in session.run(None, feeds))
    assert summary["total_seconds"] > 0 and summary["exporter"] == manifest.data["exporter"]


def test_clean_up_streams_external_weights(tiny_engine_dir, tmp_path, monkeypatch):
    """A source with one file per weight (torch's layout above 2 GB) is cleaned without loading its weights
    and saved as the graph + ONE page-aligned data file that runs exactly like the source."""
    from sdrt_export import graph

    spec = load_manifest(tiny_engine_dir).specs["unet"]
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir(), out.mkdir()
    onnx.save_model(onnx.load(str(tiny_engine_dir / "unet.onnx")), str(raw / "unet.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(raw.iterdir())) > 20
    loads = []
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a, **k: loads.append(a))
    monkeypatch.chdir(tmp_path)  # external paths must resolve beside the source, not the working directory
    files = graph.clean_up(raw / "unet.onnx", out / "unet.onnx")
    assert files == ["unet.onnx", "unet.onnx.data"] and sorted(p.name for p in out.iterdir()) == sorted(files)
    assert loads == []  # the weights were never loaded as a whole
    model = onnx.load(str(out / "unet.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            assert info["location"] == "unet.onnx.data" and int(info["offset"]) % 4096 == 0
    feeds = _inputs(spec, 2, 64, 88, np.random.default_rng(5))
    want = _session(tiny_engine_dir / "unet.onnx").run(None, feeds)
    got = _session(out / "unet.onnx").run(None, feeds)
    np.testing.assert_array_equal(got[0], want[0])
