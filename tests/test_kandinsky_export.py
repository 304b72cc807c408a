"""Kandinsky 2.2 build side: ``make-model --arch *kandinsky22*``, ``export`` of both layouts, every component
against diffusers / transformers in torch, the negative image embedding against diffusers' ``get_zero_embed``,
CPU-native graphs (recorded, opened, same output; stale ones: tests/test_load_time.py), ``info``,
``build-engines`` (ort-cpu, TensorRT-RTX) and bad folders (one-line errors, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.cli import main
from sdrt.errors import ArtifactError
from sdrt.manifest import files_digest, load_manifest
from sdrt.specs_kandinsky import CLIP_MEAN, CLIP_STD, CONSTANTS, DECODER_UNET, FAMILY, IMAGE_ENCODER, \
    KANDINSKY_COMPONENTS, MOVQ_DECODER, MOVQ_ENCODER, NEGATIVE_IMAGE_EMBEDS, PRIOR, PRIOR_TEXT_ENCODER

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow
SIZES = ["--min-size", "64", "--max-size", "128", "--max-batch", "2"]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def k22_model(kandinsky_exports) -> Path:
    """OUT of `sdrt make-model OUT --arch tiny-kandinsky22` (the session's, shared with tests/test_kandinsky.py)."""
    return kandinsky_exports("tiny-kandinsky22")[0]


@pytest.fixture(scope="module")
def k22_engines(kandinsky_exports) -> Path:
    """`sdrt export --model OUT` of k22_model (sizes 64..128, batch 2)."""
    return kandinsky_exports("tiny-kandinsky22")[1]


def test_make_model_layouts(k22_model, tmp_path):
    from diffusers import KandinskyV22InpaintPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(k22_model / "prior")
    decoder = KandinskyV22Pipeline.from_pretrained(k22_model / "decoder")
    assert prior.prior.config.embedding_dim == 32 == decoder.unet.config.encoder_hid_dim
    assert decoder.unet.config.out_channels == 8 and decoder.unet.config.addition_embed_type == "image"
    assert 2 ** (len(decoder.movq.config.block_out_channels) - 1) == 8
    assert float(prior.prior.clip_std.detach().abs().min()) > 0.5  # seeded, not diffusers' zero init
    assert type(prior.scheduler).__name__ == "UnCLIPScheduler" and type(decoder.scheduler).__name__ == "DDPMScheduler"
    inpaint = tmp_path / "inpaint"
    assert main(["make-model", str(inpaint), "--arch", "tiny-kandinsky22-inpaint"]) == 0
    pipe = KandinskyV22InpaintPipeline.from_pretrained(inpaint / "decoder")
    assert pipe.unet.config.in_channels == 9
    assert (inpaint / "prior" / "prior" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (k22_model / "prior" / "prior" / "diffusion_pytorch_model.safetensors").read_bytes()  # same seed, same bytes


def test_real_shapes_configs_fit_together(tmp_path):
    """``--arch kandinsky22``: the real-shape configs pass the exporter's dims checks (no weights written)."""
    from sdrt_export.archs import ARCHS
    from sdrt_export.kandinsky_make import DECODER_INDEX, PRIOR_INDEX
    from sdrt_export.kandinsky_model import dims_from_layout, find_layout

    arch = ARCHS["kandinsky22"]["kandinsky"]
    configs = {"prior/model_index.json": PRIOR_INDEX, "decoder/model_index.json":
               {**DECODER_INDEX, "_class_name": arch["decoder"]["pipeline"]},
               "prior/text_encoder/config.json": {**arch["prior"]["text_encoder"],
                                                  "architectures": ["CLIPTextModelWithProjection"]},
               "prior/image_encoder/config.json": {**arch["prior"]["image_encoder"],
                                                   "architectures": ["CLIPVisionModelWithProjection"]},
               "prior/prior/config.json": arch["prior"]["prior"], "decoder/unet/config.json": arch["decoder"]["unet"],
               "decoder/movq/config.json": arch["decoder"]["movq"]}
    for rel, data in configs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(data))
    for name in ("prior/tokenizer", "prior/scheduler", "decoder/scheduler"):
        (tmp_path / name).mkdir(parents=True)
    dims = dims_from_layout(find_layout(tmp_path))
    assert (dims.family, dims.image_embed_dim, dims.text_hidden_size, dims.vae_scale_factor) == (FAMILY, 1280, 1280, 8)
    assert (dims.unet_out_channels, dims.unet_in_channels, dims.image_encoder_size) == (8, 4, 224)


def test_export_manifest(k22_engines, k22_model):
    manifest = load_manifest(k22_engines)
    assert manifest.family == FAMILY and manifest.dims.family == FAMILY
    assert set(manifest.data["components"]) == set(KANDINSKY_COMPONENTS)
    for name in KANDINSKY_COMPONENTS:
        assert manifest.component(name)["check_error"] <= 1e-5
        assert manifest.verified_path(name).is_file()
    assert manifest.data["pipeline"]["class_name"] == "KandinskyV22CombinedPipeline"
    assert manifest.data["scheduler"]["_class_name"] == "DDPMScheduler"
    assert manifest.data["prior_scheduler"]["_class_name"] == "UnCLIPScheduler"
    assert manifest.data["source"] == {**manifest.data["source"], "path": str(k22_model.absolute()), "prior": None}
    assert manifest.data["vae"]["scaling_factor"] == 1.0 and manifest.tokenizer_dir.is_dir()
    assert manifest.specs[DECODER_UNET].output_names == ["out_sample"]


def _ort(manifest, name, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(manifest.verified_path(name)), providers=["CPUExecutionProvider"])
    return session.run(manifest.specs[name].output_names, feeds)


def _close(got: np.ndarray, want, bound: float = 1e-4) -> None:
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= bound * max(1.0, float(np.abs(want).max()))


def test_components_match_torch(k22_engines, k22_model):
    """Each ONNX graph vs the diffusers / transformers module called as the Kandinsky pipelines call it, at
    shapes the exporter did not trace or check (batch 3 prior, 128x64 UNet)."""
    import diffusers
    import transformers

    manifest, prior_dir, decoder_dir = load_manifest(k22_engines), k22_model / "prior", k22_model / "decoder"
    rng = np.random.default_rng(7)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(prior_dir / "tokenizer")
    tokens = tokenizer(["", "a red cat", "a castle on a hill at dawn"], padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt")
    text = transformers.CLIPTextModelWithProjection.from_pretrained(prior_dir / "text_encoder").eval()
    prior = diffusers.PriorTransformer.from_pretrained(prior_dir / "prior").eval()
    image = transformers.CLIPVisionModelWithProjection.from_pretrained(prior_dir / "image_encoder").eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(decoder_dir / "unet").eval()
    movq = diffusers.VQModel.from_pretrained(decoder_dir / "movq").eval()
    with torch.no_grad():
        ref = text(tokens.input_ids)
        embeds, hidden = _ort(manifest, PRIOR_TEXT_ENCODER, {"input_ids": tokens.input_ids.numpy().astype(np.int32)})
        _close(embeds, ref.text_embeds)
        _close(hidden, ref.last_hidden_state)

        latents = torch.from_numpy(rng.standard_normal((3, 32)).astype(np.float32))
        want = prior(latents, timestep=torch.tensor(499), proj_embedding=ref.text_embeds,
                     encoder_hidden_states=ref.last_hidden_state, attention_mask=tokens.attention_mask.bool()).\
            predicted_image_embedding
        got, = _ort(manifest, PRIOR, {"hidden_states": latents.numpy(), "timestep": np.full(3, 499, np.float32),
                                      "proj_embedding": ref.text_embeds.numpy(),
                                      "encoder_hidden_states": ref.last_hidden_state.numpy(),
                                      "attention_mask": tokens.attention_mask.numpy().astype(np.int32)})
        _close(got, want)

        pixels = torch.from_numpy(rng.standard_normal((2, 3, 224, 224)).astype(np.float32))
        _close(_ort(manifest, IMAGE_ENCODER, {"pixel_values": pixels.numpy()})[0],
               image(pixel_values=pixels).image_embeds)

        sample = torch.from_numpy(rng.standard_normal((2, 4, 16, 8)).astype(np.float32))
        image_embeds = torch.from_numpy(rng.standard_normal((2, 32)).astype(np.float32))
        want = unet(sample, torch.tensor(981), encoder_hidden_states=None,
                    added_cond_kwargs={"image_embeds": image_embeds}).sample
        got, = _ort(manifest, DECODER_UNET, {"sample": sample.numpy(), "timestep": np.full(2, 981, np.float32),
                                             "image_embeds": image_embeds.numpy()})
        assert got.shape[1] == 8
        _close(got, want)

        _close(_ort(manifest, MOVQ_DECODER, {"latent": sample.numpy()})[0],
               movq.decode(sample, force_not_quantize=True).sample)
        images = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 64, 128)).astype(np.float32))
        _close(_ort(manifest, MOVQ_ENCODER, {"images": images.numpy()})[0], movq.encode(images).latents)


def test_native_graphs_recorded_opened_and_equal(k22_engines, tmp_path, opened):
    """fp32 export: each component's CPU-native graph recorded as SD's are; ort-cpu opens it without graph
    optimization and it computes what the exported ONNX does (components within 1e-5 relative L2, images 1e-5)."""
    import onnxruntime

    from sdrt.backends import open_engine
    from sdrt.backends.ort_native import NATIVE, cpu_identity
    from sdrt.pipeline import Pipeline
    from sdrt_export.checks import relative_error
    from sdrt_export.kandinsky import make_inputs

    manifest = load_manifest(k22_engines)
    records = manifest.engines(NATIVE)["components"]
    assert sorted(records) == sorted(KANDINSKY_COMPONENTS)
    disabled = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    rng = np.random.default_rng(3)
    for name, record in records.items():
        assert record["version"] == onnxruntime.__version__ and record["cpu"] == cpu_identity()
        assert record["source"] == "onnx" and record["source_sha256"] == manifest.onnx_digest(name)
        assert [f["path"] for f in record["files"]] == [f"{NATIVE}/{name}.onnx", f"{NATIVE}/{name}.onnx.data"]
        opened.clear()
        engine = open_engine(manifest, name, threads=1)
        assert opened == [(f"{NATIVE}/{name}.onnx", disabled)]
        spec = manifest.specs[name]
        feeds = dict(zip(spec.input_names, make_inputs(spec, (2, 64, 128), rng)))
        want = _ort(manifest, name, feeds)
        for got, ref in zip((engine(feeds)[n] for n in spec.output_names), want):
            assert relative_error(got, ref) <= 1e-5, name
    request = dict(steps=2, prior_steps=2, width=64, height=64, seed=5)
    opened.clear()
    native = Pipeline(k22_engines, threads=1).txt2img("a cat", **request).unit_images
    assert {path for path, _ in opened} == {f"{NATIVE}/{n}.onnx" for n in (PRIOR_TEXT_ENCODER, PRIOR, DECODER_UNET,
                                                                           MOVQ_DECODER)}
    plain = tmp_path / "plain"
    shutil.copytree(k22_engines, plain)
    data = json.loads((plain / "manifest.json").read_text())
    del data["engines"][NATIVE]
    (plain / "manifest.json").write_text(json.dumps(data))
    np.testing.assert_allclose(native, Pipeline(plain, threads=1).txt2img("a cat", **request).unit_images,
                               rtol=1e-5, atol=1e-5)


def test_constants_equal_diffusers(k22_engines, k22_model):
    from diffusers import KandinskyV22PriorPipeline

    manifest = load_manifest(k22_engines)
    pipe = KandinskyV22PriorPipeline.from_pretrained(k22_model / "prior")
    with torch.no_grad():
        zero = pipe.get_zero_embed(batch_size=1).numpy()
    negative = manifest.constant(NEGATIVE_IMAGE_EMBEDS)
    assert negative.dtype == np.float32 and negative.shape == zero.shape == (1, 32)
    assert float(np.abs(negative - zero).max()) <= 1e-6 and float(np.abs(zero).max()) > 1e-3
    np.testing.assert_array_equal(manifest.constant(CLIP_MEAN), pipe.prior.clip_mean.detach().numpy())
    np.testing.assert_array_equal(manifest.constant(CLIP_STD), pipe.prior.clip_std.detach().numpy())
    onnx_zero, = _ort(manifest, IMAGE_ENCODER, {"pixel_values": np.zeros((1, 3, 224, 224), np.float32)})
    _close(onnx_zero, zero, 1e-5)


def test_decoder_and_prior_folders(k22_engines, k22_model, tmp_path, capsys):
    """``--model DECODER --prior PRIOR`` gives the same graphs and constants as the OUT/{prior,decoder} layout."""
    out = tmp_path / "engines"
    code, _, err = run(capsys, "export", "--model", k22_model / "decoder", "--prior", k22_model / "prior", "--out",
                       out, *SIZES)
    assert code == 0, err
    a, b = load_manifest(k22_engines).data, load_manifest(out).data
    assert b["source"]["prior"] == str((k22_model / "prior").absolute())
    for name in KANDINSKY_COMPONENTS:
        assert a["components"][name]["files"][0]["sha256"] == b["components"][name]["files"][0]["sha256"]
    for name in CONSTANTS:
        assert a["constants"][name]["sha256"] == b["constants"][name]["sha256"]
    assert load_manifest(out).rebuild_command("tensorrt").split()[3:6] == \
        [str((k22_model / "decoder").absolute()), "--prior", str((k22_model / "prior").absolute())]


def test_info(k22_engines, tmp_path, capsys):
    code, out, err = run(capsys, "info", k22_engines, "--json", "--verify")
    assert code == 0, err
    report = json.loads(out)
    assert report["family"] == FAMILY and report["pipeline"] == "KandinskyV22CombinedPipeline"
    assert set(report["components"]) == set(KANDINSKY_COMPONENTS) and set(report["constants"]) == set(CONSTANTS)
    assert report["prior_scheduler"]["class_name"] == "UnCLIPScheduler" and report["verify"]["ok"]
    code, text, _ = run(capsys, "info", k22_engines)
    assert code == 0 and "UnCLIPScheduler" in text and "constants/negative_image_embeds.npy (1x32 float32)" in text
    tampered = tmp_path / "tampered"
    shutil.copytree(k22_engines, tampered)
    (tampered / "constants" / "clip_std.npy").write_bytes(b"\x93NUMPY broken")
    code, out, _ = run(capsys, "info", tampered, "--json", "--verify")
    problems = json.loads(out)["verify"]["problems"]
    assert [p["path"] for p in problems] == ["constants/clip_std.npy"]
    with pytest.raises(ArtifactError, match="clip_std.npy"):
        load_manifest(tampered).constant(CLIP_STD)


def test_build_engines_ort_cpu(k22_engines, k22_model, tmp_path, capsys):
    out = tmp_path / "engines"
    shutil.copytree(k22_engines, out)
    code, _, err = run(capsys, "build-engines", "--model", k22_model, "--out", out, "--backend", "ort-cpu")
    assert code == 0, err
    manifest = load_manifest(out)
    assert set(manifest.engines("ort-cpu")["components"]) == set(KANDINSKY_COMPONENTS)
    for name in KANDINSKY_COMPONENTS:
        manifest.verified_engine("ort-cpu", name)
        native = manifest.engines("ort-cpu-native")["components"][name]  # rewritten from the ort-cpu graph
        assert native["source"] == "ort-cpu" and native["source_sha256"] == files_digest(
            manifest.engines("ort-cpu")["components"][name]["files"])
    code, out_text, _ = run(capsys, "build-engines", "--model", k22_model, "--out", out, "--backend", "ort-cpu",
                            "--json")
    summary = json.loads(out_text)  # a second run: nothing exported or built, every component cached
    assert code == 0 and not summary["built"] and summary["exported"] is None
    assert set(summary["cached"]) == set(KANDINSKY_COMPONENTS)


def test_build_engines_tensorrt_rtx(k22_engines, k22_model, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt_rtx (pip install tensorrt-rtx)")
    out = tmp_path / "engines"
    shutil.copytree(k22_engines, out)
    code, _, err = run(capsys, "build-engines", "--model", k22_model / "decoder", "--prior", k22_model / "prior",
                       "--out", out, "--backend", "tensorrt-rtx", "--json")
    assert code == 0, err
    manifest = load_manifest(out)
    section = manifest.engines("tensorrt-rtx")
    assert set(section["components"]) == set(KANDINSKY_COMPONENTS) and "--prior" in section["command"]
    for name in KANDINSKY_COMPONENTS:
        path, record = manifest.verified_engine("tensorrt-rtx", name)
        assert path.stat().st_size > 0 and record["profile"] == \
            {k: [list(s) for s in v] for k, v in manifest.specs[name].profile(manifest.sizes).items()}


def test_fp16_components(k22_model, tmp_path):
    """fp16 with fp32 islands on the prior and the MoVQ decoder, checked on the emulated strongly typed graph."""
    from sdrt.specs import SizeRange
    from sdrt_export import fp16
    from sdrt_export.kandinsky import export_one
    from sdrt_export.kandinsky_model import dims_from_layout, find_layout
    from sdrt.specs import build_specs

    layout = find_layout(k22_model)
    specs = build_specs(dims_from_layout(layout))
    for name in (PRIOR, MOVQ_DECODER):
        work = tmp_path / name
        work.mkdir()
        result = export_one(layout, specs[name], work, SizeRange(64, 64, 128, 2), 17, "fp16")
        assert result["check_error"] <= fp16.FP16_TOLERANCE and result["precision"] == "fp16"
        islands = {island["name"] for island in result["extra"]["fp32_islands"]}
        assert "norm-reductions" in islands
        assert ("timestep-embedding" if name == PRIOR else "vae-decoder-up-blocks") in islands


def _fails(capsys, *args, match: str, out: Path) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and match in err, err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_folders(k22_model, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, "export", "--model", k22_model / "decoder", "--out", out, match="--prior PRIOR_DIR", out=out)
    _fails(capsys, "export", "--model", k22_model / "decoder", "--prior", tmp_path / "nope", "--out", out,
           match="prior folder", out=out)
    _fails(capsys, "export", "--model", k22_model / "prior", "--out", out, match="pass the decoder", out=out)
    half = tmp_path / "half"
    shutil.copytree(k22_model / "prior", half / "prior")
    _fails(capsys, "export", "--model", half, "--out", out, match="decoder/model_index.json", out=out)
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _fails(capsys, "export", "--model", sd, "--prior", k22_model / "prior", "--out", out, match="--prior is for",
           out=out)
    other = tmp_path / "other"
    shutil.copytree(k22_model, other)
    config = other / "decoder" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "encoder_hid_dim": 64}))
    _fails(capsys, "export", "--model", other, "--out", out, match="encoder_hid_dim", out=out)
    _fails(capsys, "build-engines", "--model", other / "decoder", "--prior", other / "prior", "--out", out,
           "--backend", "ort-cpu", match="do not fit together", out=out)
