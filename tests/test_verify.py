"""``sdrt verify``: reports per-stage errors and the image error, exits 1 past tolerance."""

from __future__ import annotations

import json
import shutil

from sdrt.cli import main


def run_verify(capsys, model, engines, *extra):
    code = main(["verify", "--model", str(model), "--engines", str(engines), "--steps", "3", "--width", "64",
                 "--height", "72", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_verify_passes_on_a_faithful_export(capsys, tiny_model_dir, tiny_engine_dir):
    code, report = run_verify(capsys, tiny_model_dir, tiny_engine_dir, "--scheduler", "Euler a")
    assert code == 0, report
    assert report["failed"] is False
    assert set(report["stages_rel_l2"]) == {"text_embeddings", "unet_step", "vae_decode", "vae_encode"}
    assert all(0 <= v < 1e-4 for v in report["stages_rel_l2"].values())
    assert report["image_max_abs"] <= 1e-4 and report["image_psnr_db"] > 60
    assert report["size"] == "64x72" and report["scheduler"] == "Euler a"


def test_verify_fails_when_the_artifact_differs(capsys, tiny_model_dir, tiny_engine_dir, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["vae"]["scaling_factor"] = 0.25  # the runtime now decodes different latents than diffusers
    (engines / "manifest.json").write_text(json.dumps(manifest))
    code, report = run_verify(capsys, tiny_model_dir, engines)
    assert code == 1
    assert report["failed"] is True and report["image_max_abs"] > 1e-4


def test_verify_bad_scheduler_is_one_line_error(capsys, tiny_model_dir, tiny_engine_dir):
    code = main(["verify", "--model", str(tiny_model_dir), "--engines", str(tiny_engine_dir), "--scheduler", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown scheduler" in err[0]
