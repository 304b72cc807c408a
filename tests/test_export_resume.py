"""`sdrt export --resume`: checked components survive a failure and are reused; anything else starts over."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sdrt.cli import main
from sdrt.manifest import load_manifest

FAIL_AT = "vae_decoder"  # the third component: text_encoder and unet are checked before it


def _args(model, out, *extra):
    return ["export", "--model", str(model), "--out", str(out), "--min-size", "64", "--max-size", "128",
            "--max-batch", "1", "--json", *extra]


@pytest.fixture
def exports(monkeypatch):
    """The components torch.onnx.export ran for, in order; ``fail[name] = exc`` makes that one raise."""
    from sdrt_export import exporter

    real, calls, fail = exporter.torch_export, [], {}

    def spy(module, spec, *args, **kwargs):
        calls.append(spec.name)
        if spec.name in fail:
            raise fail.pop(spec.name)
        return real(module, spec, *args, **kwargs)

    monkeypatch.setattr(exporter, "torch_export", spy)
    return calls, fail


def _partial(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _fail_once(model, out, exports, capsys, exc=None) -> str:
    calls, fail = exports
    fail[FAIL_AT] = exc or RuntimeError("injected")
    code = main(_args(model, out, "--resume"))
    err = capsys.readouterr().err.strip()
    assert code == (130 if isinstance(exc, KeyboardInterrupt) else 2), err
    assert calls == ["text_encoder", "unet", FAIL_AT]
    calls.clear()
    return err


def _run(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_failure_keeps_checked_components_and_resume_reuses_them(tiny_model_dir, tiny_engine_dir, tmp_path, exports,
                                                                 capsys):
    out = tmp_path / "engine"
    err = _fail_once(tiny_model_dir, out, exports, capsys)
    assert len(err.splitlines()) == 1 and "injected" in err and "rerun with --resume" in err, err
    assert not out.exists()
    staged = _partial(out)
    progress = json.loads((staged / "progress.json").read_text())
    assert list(progress["components"]) == ["text_encoder", "unet"]
    kept = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    recorded = {rel for c in progress["components"].values() for rel in c["records"]}
    assert kept == recorded | {"progress.json"}  # the failed component's files and scratch are gone
    assert "ort-cpu-native/unet.onnx" in recorded and not any("vae_decoder" in k for k in kept)
    unet_bytes = (staged / "unet.onnx").read_bytes()

    summary = _run(_args(tiny_model_dir, out, "--resume"), capsys)
    assert exports[0] == [FAIL_AT, "vae_encoder"]  # only what was not checked before
    assert summary["resumed"] == ["text_encoder", "unet"]
    assert not staged.exists()
    manifest = load_manifest(out)
    for name in ("text_encoder", "unet", FAIL_AT, "vae_encoder"):
        manifest.verified_path(name)  # every file's digest matches the manifest
    assert (out / "unet.onnx").read_bytes() == unet_bytes
    assert not (out / "progress.json").exists()
    assert manifest.engines("ort-cpu-native")["components"].keys() >= {"text_encoder", "unet", FAIL_AT}

    # the resumed artifact computes what a plain export of the same model computes
    rng, spec = np.random.default_rng(0), manifest.specs["unet"]
    feeds = {t.name: rng.standard_normal(t.shape(1, 64, 64, spec.scale)).astype(t.dtype) for t in spec.inputs}
    got, want = (ort.InferenceSession(str(root / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                 for root in (out, tiny_engine_dir))
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_interrupt_damage_and_other_inputs(tiny_model_dir, tmp_path, exports, capsys, caplog):
    """Interrupted: kept. A plain export beside it: untouched. A damaged file, or other sizes: exported again."""
    calls, fail = exports
    out, staged = tmp_path / "engine", _partial(tmp_path / "engine")

    def run(*extra, at="unet", exc=None) -> list[str]:
        fail[at] = exc or RuntimeError("injected")
        main(_args(tiny_model_dir, out, *extra))
        done = list(calls)
        calls.clear()
        return done

    assert run("--resume", exc=KeyboardInterrupt()) == ["text_encoder", "unet"]
    kept = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*"))
    assert "text_encoder.onnx" in kept and not any(k.startswith("unet") for k in kept)

    assert run(at="text_encoder") == ["text_encoder"]  # without --resume: its own temp folder, partial untouched
    assert "pass --resume to continue it" in caplog.text
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*")) == kept
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []

    (staged / ".raw-unet").mkdir()  # what a killed run leaves: scratch and a half-written component
    (staged / ".raw-unet" / "unet.onnx").write_bytes(b"half")
    (staged / "unet.onnx").write_bytes(b"half")
    assert run("--resume") == ["unet"]  # the text encoder reused, the leftovers cleared
    assert not (staged / ".raw-unet").exists() and not (staged / "unet.onnx").exists()
    data = staged / "text_encoder.onnx"
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    assert run("--resume") == ["text_encoder", "unet"]
    assert "text_encoder.onnx changed since it was checked" in caplog.text

    caplog.clear()
    assert run("--resume", "--max-size", "256") == ["text_encoder", "unet"]  # other sizes: start over
    assert "made for other inputs" in caplog.text
    assert not out.exists()


def test_concurrent_resume_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "engine"
    staged = _partial(out)
    staged.mkdir()
    holder = os.open(staged, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert main(_args(tiny_model_dir, out, "--resume")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another `sdrt export --resume`" in err, err
    finally:
        os.close(holder)
    assert not out.exists()


def test_build_engines_exports_with_resume(tiny_model_dir, tmp_path, monkeypatch):
    """`sdrt build-engines` rebuilds only what changed; its export step resumes the same way."""
    from sdrt.errors import ExportError
    from sdrt.specs import SizeRange
    from sdrt_export import build_engines, exporter

    seen = {}

    def fake(model, out, sizes=None, force=False, progress=True, precision="fp32", resume=False, **kwargs):
        seen.update(resume=resume, force=force)
        raise ExportError("stopped here")

    monkeypatch.setattr(exporter, "export_model", fake)
    with pytest.raises(ExportError, match="stopped here"):
        build_engines.ensure_onnx(tiny_model_dir, tmp_path / "engine", SizeRange(64, 64, 128, 1), "fp32", False)
    assert seen == {"resume": True, "force": True}
