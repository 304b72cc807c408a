"""Bad input to the runtime: a typed SdrtError from the Python API; exit 2, one stderr line, no output
file from the CLI. Runs on the tiny exported model at 64x64 with 2-3 steps."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

import sdrt.pipeline
import sdrt.pipelines.base
from sdrt.cli import main
from sdrt.errors import (
    ArtifactError,
    Cancelled,
    ImageInputError,
    InputError,
    NumericsError,
    SchedulerNameError,
    SdrtError,
)
from sdrt.pipeline import Pipeline

FAST = {"steps": 2, "width": 64, "height": 64, "seed": 0}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def pipe(tiny_engine_dir):
    """One Pipeline for the module's Python API tests (engines open once)."""
    return Pipeline(tiny_engine_dir, threads=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Input files: a 64x64 image and mask, a 72x64 mask, and files that are not (readable) images."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros((64, 72), np.uint8)).save(root / "mask-72x64.png")
    (root / "x.png").write_text("this is a text file, not a PNG\n")
    data = (root / "in.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # a valid PNG header declaring 20000x20000 pixels: Pillow refuses it as a decompression bomb
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b""))
                                    + chunk(b"IEND", b""))
    return root


@pytest.fixture
def out_dir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def engine_copy(tiny_engine_dir, tmp_path):
    """A private copy of the tiny ENGINE_DIR to tamper with."""
    return Path(shutil.copytree(tiny_engine_dir, tmp_path / "engine"))


def _args(mode: str, engines, out_dir: Path, images: Path | None = None, *extra: str) -> list[str]:
    args = [mode, "--engines", str(engines), "--prompt", "a photo of a cat", "--steps", "2", "--width", "64",
            "--height", "64", "--seed", "0", "--out", str(out_dir / "cat.png")]
    if mode != "txt2img":
        args += ["--image", str(images / "in.png")]
    if mode == "inpaint":
        args += ["--mask", str(images / "mask.png")]
    return args + list(extra)  # argparse keeps the last occurrence, so extra options override the above


def _refused(capsys, argv: list[str], out_dir: Path, *needles: str) -> str:
    """Run the CLI; assert exit 2, exactly one stderr line naming the problem, and no file written."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert "Traceback" not in captured.err
    assert line.startswith(f"sdrt {argv[0]}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert captured.out == ""
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no cat.png, no .cat.png.* temp file
    return line


def _flip_bytes(path: Path) -> None:
    """Change bytes in the middle of a file, keeping its size (so only the sha256 can tell)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def _inject_nan(component: str, at_call: int):
    """An ``open_engine`` replacement whose ``component`` engine puts a NaN in its output on call ``at_call``
    (1-based); every call of that engine is counted in ``calls``."""
    real_open = sdrt.pipelines.base.open_engine
    calls = []

    def open_engine(manifest, name, *args, **kwargs):
        engine = real_open(manifest, name, *args, **kwargs)
        if name != component:
            return engine

        def run(feeds):
            outputs = engine(feeds)
            calls.append(name)
            if len(calls) == at_call:
                outputs = {k: v.copy() for k, v in outputs.items()}
                first = next(iter(outputs))
                outputs[first].flat[0] = np.nan
            return outputs

        return run

    return open_engine, calls


# ---------------------------------------------------------------- CLI: request parameters


@pytest.mark.parametrize("extra, needles", [
    (["--width", "100"], ["width 100", "multiple of 8"]),
    (["--height", "60"], ["height 60", "multiple of 8"]),
    (["--width", "512"], ["width 512", "64..256"]),
    (["--height", "32"], ["height 32", "64..256"]),
    (["--width", "-64"], ["width -64", "64..256"]),
    (["--steps", "0"], ["steps", "0"]),
    (["--steps", "-3"], ["steps", "-3"]),
    (["--guidance", "nan"], ["guidance", "nan"]),
    (["--guidance", "inf"], ["guidance", "inf"]),
    (["--guidance", "-1"], ["guidance", "-1"]),
    (["--batch", "0"], ["batch", "0"]),
    (["--batch", "3"], ["batch 3", "1..2"]),
    (["--scheduler", "Eulr b"], ["Eulr b", "Euler a", "DPM++ 2M Karras", "DDIM"]),
    (["--out", "cat.jpg"], ["--out", ".png", "cat.jpg"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else None)
def test_bad_request_txt2img(extra, needles, tiny_engine_dir, out_dir, capsys):
    if extra[0] == "--out":
        extra = ["--out", str(out_dir / extra[1])]
    _refused(capsys, _args("txt2img", tiny_engine_dir, out_dir, None, *extra), out_dir, *needles)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("strength", ["0", "-0.1", "1.5", "nan"])
def test_bad_strength(mode, strength, tiny_engine_dir, images, out_dir, capsys):
    _refused(capsys, _args(mode, tiny_engine_dir, out_dir, images, "--strength", strength), out_dir,
             "strength", "(0, 1]")


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("name, needles", [
    ("missing.png", ["image", "missing.png", "does not exist"]),
    ("x.png", ["image", "x.png", "not an image"]),
    ("truncated.png", ["image", "truncated.png", "cannot be read"]),
    ("bomb.png", ["image", "bomb.png", "decompression bomb"]),
])
def test_bad_image(mode, name, needles, tiny_engine_dir, images, out_dir, capsys):
    _refused(capsys, _args(mode, tiny_engine_dir, out_dir, images, "--image", str(images / name)), out_dir,
             *needles)


@pytest.mark.parametrize("name, needles", [
    ("missing.png", ["mask", "missing.png", "does not exist"]),
    ("x.png", ["mask", "x.png", "not an image"]),
    ("mask-72x64.png", ["mask size 72x64", "image size 64x64"]),
])
def test_bad_mask(name, needles, tiny_engine_dir, images, out_dir, capsys):
    _refused(capsys, _args("inpaint", tiny_engine_dir, out_dir, images, "--mask", str(images / name)), out_dir,
             *needles)


def test_strength_too_small_for_steps(tiny_engine_dir, images, out_dir, capsys):
    _refused(capsys, _args("img2img", tiny_engine_dir, out_dir, images, "--strength", "0.01",
                           "--scheduler", "Euler"), out_dir, "strength 0.01", "no denoising step")


# ---------------------------------------------------------------- CLI: the artifact


def _edit_manifest(engine: Path, edit) -> None:
    path = engine / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, needles", [
    ("engine dir missing", ["does not exist", "sdrt export"]),
    ("manifest missing", ["manifest.json", "not an sdrt artifact"]),
    ("manifest not JSON", ["manifest.json", "not valid JSON"]),
    ("manifest a list", ["manifest.json", "not a JSON object"]),
    ("manifest lacks keys", ["manifest.json", "lacks", "components", "sizes"]),
    ("format version", ["format version 99"]),
    ("vae section empty", ["malformed", "vae.scaling_factor"]),
    ("scheduler not object", ["malformed", "scheduler"]),
    ("dims not integers", ["malformed", "dims.latent_channels"]),
    ("file path escapes", ["malformed", "not inside the artifact"]),
    ("component missing", ["no unet component"]),
    ("component file missing", ["vae_decoder.onnx", "missing", "sdrt export"]),
    ("tokenizer missing", ["tokenizer"]),
])
def test_bad_artifact(case, needles, engine_copy, out_dir, capsys):
    manifest = engine_copy / "manifest.json"
    engines = engine_copy
    if case == "engine dir missing":
        engines = engine_copy.parent / "no-such-engine"
    elif case == "manifest missing":
        manifest.unlink()
    elif case == "manifest not JSON":
        manifest.write_text('{"format_version": 1, "components": ')
    elif case == "manifest a list":
        manifest.write_text("[]")
    elif case == "manifest lacks keys":
        _edit_manifest(engine_copy, lambda d: (d.pop("components"), d.pop("sizes")))
    elif case == "format version":
        _edit_manifest(engine_copy, lambda d: d.update(format_version=99))
    elif case == "vae section empty":
        _edit_manifest(engine_copy, lambda d: d.update(vae={}))
    elif case == "scheduler not object":
        _edit_manifest(engine_copy, lambda d: d.update(scheduler=5))
    elif case == "dims not integers":
        _edit_manifest(engine_copy, lambda d: d["dims"].update(latent_channels="4"))
    elif case == "file path escapes":
        _edit_manifest(engine_copy, lambda d: d["components"]["unet"]["files"][0].update(path="../unet.onnx"))
    elif case == "component missing":
        _edit_manifest(engine_copy, lambda d: d["components"].pop("unet"))
    elif case == "component file missing":
        (engine_copy / "vae_decoder.onnx").unlink()
    elif case == "tokenizer missing":
        shutil.rmtree(engine_copy / "tokenizer")
    _refused(capsys, _args("txt2img", engines, out_dir), out_dir, *needles)


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_tampered_component_refused_before_onnxruntime(component, engine_copy, out_dir, capsys, monkeypatch):
    # without its CPU-native graphs the artifact runs the exported ONNX (tampered native graphs: test_load_time)
    _edit_manifest(engine_copy, lambda d: d.get("engines", {}).pop("ort-cpu-native", None))
    tampered = engine_copy / f"{component}.onnx"
    _flip_bytes(tampered)
    real_session = onnxruntime.InferenceSession
    opened = []

    def guarded_session(path, *args, **kwargs):
        if Path(path).resolve() == tampered.resolve():
            pytest.fail(f"onnxruntime was handed the tampered {tampered.name} before its sha256 was checked")
        opened.append(Path(path).name)
        return real_session(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", guarded_session)
    _refused(capsys, _args("txt2img", engine_copy, out_dir), out_dir,
             f"{component}.onnx", "sha256", "sdrt export")
    assert tampered.name not in opened


def test_nan_in_unet_via_cli(tiny_engine_dir, out_dir, capsys, monkeypatch):
    fake_open, calls = _inject_nan("unet", at_call=2)
    monkeypatch.setattr(sdrt.pipelines.base, "open_engine", fake_open)
    line = _refused(capsys, _args("txt2img", tiny_engine_dir, out_dir, None, "--scheduler", "Euler"), out_dir,
                    "NaN", "latents", "step")
    assert len(calls) == 2, line  # stopped at the step that produced it


# ---------------------------------------------------------------- Python API: the same typed errors


@pytest.mark.parametrize("options, needle", [
    ({"width": 100}, "multiple of 8"),
    ({"height": 512}, "64..256"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"guidance": math.nan}, "guidance"),
    ({"guidance": -0.5}, "guidance"),
    ({"batch": 3}, "1..2"),
    ({"batch": 0}, "batch"),
])
def test_api_input_errors(options, needle, pipe):
    with pytest.raises(InputError, match=re.escape(needle)):
        pipe.txt2img("a cat", **{**FAST, **options})


def test_api_strength_and_images(pipe, images):
    with pytest.raises(InputError, match=re.escape("(0, 1]")):
        pipe.img2img(images / "in.png", "a cat", strength=1.5, **FAST)
    with pytest.raises(ImageInputError, match="does not exist"):
        pipe.img2img(images / "missing.png", "a cat", strength=0.5, **FAST)
    with pytest.raises(ImageInputError, match="not an image"):
        pipe.inpaint(images / "in.png", images / "x.png", "a cat", **FAST)
    with pytest.raises(ImageInputError, match="cannot be read"):
        pipe.img2img(str(images / "truncated.png"), "a cat", **FAST)


def test_api_scheduler_name(pipe):
    with pytest.raises(SchedulerNameError) as info:
        pipe.txt2img("a cat", scheduler="Eulr b", **FAST)
    assert "Euler a" in str(info.value) and "DPM++ 2M Karras" in str(info.value)
    assert isinstance(info.value, InputError) and info.value.exit_code == 2


def test_api_artifact_errors(tmp_path, engine_copy):
    with pytest.raises(ArtifactError, match="does not exist"):
        Pipeline(tmp_path / "nowhere")
    (engine_copy / "manifest.json").write_text("not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Pipeline(engine_copy)


def test_api_tampered_unet(engine_copy):
    _edit_manifest(engine_copy, lambda d: d.get("engines", {}).pop("ort-cpu-native", None))  # run the exported ONNX
    _flip_bytes(engine_copy / "unet.onnx")
    with pytest.raises(ArtifactError, match="sha256"):
        Pipeline(engine_copy).txt2img("a cat", **FAST)


def test_api_nan_in_unet_names_stage_and_step(pipe, monkeypatch):
    fake_open, calls = _inject_nan("unet", at_call=2)
    monkeypatch.setattr(pipe, "_engines", {})  # reopen through the patched open_engine
    monkeypatch.setattr(sdrt.pipelines.base, "open_engine", fake_open)
    with pytest.raises(NumericsError) as info:
        pipe.txt2img("a cat", **{**FAST, "steps": 3, "scheduler": "Euler"})
    message = str(info.value)
    assert "latents" in message and re.search(r"\bstep \d", message), message
    assert "\n" not in message
    assert len(calls) == 2


@pytest.mark.parametrize("step", [1, 3])
def test_api_nan_step_is_counted_like_cancel(pipe, monkeypatch, step):
    """A NaN produced by the k-th UNet call and a callback cancelling after the k-th step name the same
    "step k/N" (1-based, same total); the callback never sees the step that went NaN."""
    options = {**FAST, "steps": 3, "scheduler": "Euler"}
    with pytest.raises(Cancelled) as cancelled:
        pipe.txt2img("a cat", callback=lambda i, n, t, latents: i != step - 1, **options)
    fake_open, calls = _inject_nan("unet", at_call=step)
    monkeypatch.setattr(pipe, "_engines", {})
    monkeypatch.setattr(sdrt.pipelines.base, "open_engine", fake_open)
    seen = []
    with pytest.raises(NumericsError) as nan:
        pipe.txt2img("a cat", callback=lambda i, n, t, latents: seen.append(i), **options)
    where = [re.search(r"step (\d+)/(\d+)", str(e.value)).groups() for e in (cancelled, nan)]
    assert where[0] == where[1] == (str(step), "3"), (str(cancelled.value), str(nan.value))
    assert len(calls) == step and seen == list(range(step - 1))


def test_api_nan_in_vae_decoder(pipe, monkeypatch):
    fake_open, calls = _inject_nan("vae_decoder", at_call=1)
    monkeypatch.setattr(pipe, "_engines", {})
    monkeypatch.setattr(sdrt.pipelines.base, "open_engine", fake_open)
    with pytest.raises(NumericsError, match=r"decoded image \(vae_decoder\)") as info:
        pipe.txt2img("a cat", **FAST)
    assert "decoded image" in str(info.value)
    assert calls == ["vae_decoder"]


def test_api_callback_false_cancels(pipe):
    seen = []

    def callback(i, total, t, latents):
        seen.append((i, total))
        assert latents.shape == (1, 4, 8, 8) and np.isfinite(latents).all()
        return False if i == 1 else None  # None (no return) goes on

    with pytest.raises(Cancelled, match=r"step 2/3") as info:
        pipe.txt2img("a cat", callback=callback, **{**FAST, "steps": 3, "scheduler": "Euler"})
    assert seen == [(0, 3), (1, 3)]
    assert isinstance(info.value, SdrtError)


def test_api_mask_size_is_image_error(pipe, images):
    with pytest.raises(ImageInputError, match="mask size 72x64"):
        pipe.inpaint(images / "in.png", images / "mask-72x64.png", "a cat", **FAST)


@pytest.mark.parametrize("side", ["width", "height"])
def test_api_zero_size_refused(side, pipe):
    with pytest.raises(InputError, match="64..256"):
        pipe.txt2img("a cat", **{**FAST, side: 0})
