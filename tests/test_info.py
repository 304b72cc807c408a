"""``sdrt info`` on each tiny family, on ort-cpu graphs, on tampered and foreign folders; ``sdrt --version``."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest

from sdrt.cli import main
from sdrt.info import DISTRIBUTIONS
from sdrt.manifest import load_manifest



def info(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["info", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def families(tiny_model_dir, tiny_engine_dir, family_exports):
    """arch -> (model folder, ENGINE_DIR): the session's tiny export and family exports (tests/conftest.py)."""
    pytest.importorskip("torch")
    return lambda arch: (tiny_model_dir, tiny_engine_dir) if arch == "tiny" else family_exports(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch, family", [("tiny", "sd15"), ("tiny-sd2", "sd2"), ("tiny-sd-turbo", "sd-turbo"),
                                          ("tiny-lcm", "lcm"), ("tiny-sdxl", "sdxl"), ("tiny-sdxl-turbo", "sdxl-turbo")])
def test_info_on_each_family(families, arch, family, capsys):
    from sdrt_export.wrappers import dims_from_model, read_json

    model, engines = families(arch)
    assert dims_from_model(model).family == family
    code, out, err = info(capsys, engines, "--json")
    assert code == 0 and not err
    report = json.loads(out)
    manifest = load_manifest(engines)
    config = read_json(model / "scheduler" / "scheduler_config.json")
    assert report["family"] == family
    assert report["scheduler"]["class_name"] == config["_class_name"]
    assert report["scheduler"]["prediction_type"] == config.get("prediction_type", "epsilon")
    assert report["sizes"] == {"min": manifest.sizes.min_size, "opt": manifest.sizes.opt_size,
                               "max": manifest.sizes.max_size, "multiple_of": 8}
    assert report["batch"] == {"min": 1, "max": manifest.sizes.max_batch}
    sdxl = family.startswith("sdxl")
    assert ("text_encoder_2" in report["components"]) == sdxl and ("tokenizer_2" in report["tokenizers"]) == sdxl
    for name, component in report["components"].items():
        files = manifest.component(name)["files"]
        assert component["bytes"] == sum((engines / f["path"]).stat().st_size for f in files)
        assert component["precision"] == manifest.component(name)["precision"]
    assert report["loras"] == [] and all(not b["built"] for b in report["backends"].values())
    code, text, _ = info(capsys, engines)
    assert code == 0 and f"  family      {family} (" in text and "  LoRAs       none" in text
    assert f"batch 1..{manifest.sizes.max_batch}" in text and config["_class_name"] in text


@pytest.fixture(scope="module")
def with_graphs(tiny_model_dir, tiny_engine_dir, tmp_path_factory):
    """A copy of the tiny ENGINE_DIR with ort-cpu graphs built (sdrt build-engines --backend ort-cpu)."""
    pytest.importorskip("torch")
    from sdrt_export.build_engines import build_engines

    engines = tmp_path_factory.mktemp("info-graphs") / "engines"
    shutil.copytree(tiny_engine_dir, engines)
    build_engines(tiny_model_dir, engines, "ort-cpu", progress=False)
    return engines


def test_info_reports_optimized_graphs_and_verifies(with_graphs, capsys):
    import onnxruntime

    code, out, err = info(capsys, with_graphs, "--verify", "--json")
    assert code == 0 and not err
    report = json.loads(out)
    graphs = report["backends"]["ort-cpu"]
    records = load_manifest(with_graphs).engines("ort-cpu")["components"]
    assert graphs["built"] == list(load_manifest(with_graphs).data["components"]) and not graphs["missing"]
    assert graphs["version"] == graphs["installed_version"] == onnxruntime.__version__
    assert graphs["bytes"] == sum((with_graphs / f["path"]).stat().st_size for r in records.values()
                                  for f in r["files"])
    assert not graphs["stale"] and report["backends"]["tensorrt"]["built"] == []
    assert report["verify"]["ok"] and report["verify"]["problems"] == []
    assert report["verify"]["files"] == sum(1 for p in with_graphs.rglob("*") if p.is_file()) - 1  # manifest
    code, out, _ = info(capsys, with_graphs, "--verify")
    assert code == 0 and f"optimized graphs for onnxruntime {onnxruntime.__version__}" in out
    assert f"all {report['verify']['files']} match their sha256" in out


def test_info_verify_reports_each_tampered_file(with_graphs, tmp_path, capsys):
    engines = tmp_path / "engines"
    shutil.copytree(with_graphs, engines)
    unet = engines / "unet.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 1  # same size, other bytes
    unet.write_bytes(bytes(data))
    (engines / "ort-cpu" / "vae_decoder.onnx").unlink()
    with open(engines / "tokenizer" / "vocab.json", "ab") as handle:
        handle.write(b" ")
    code, out, err = info(capsys, engines, "--verify", "--json")
    assert code == 1 and not err
    problems = {p["path"]: p["problem"] for p in json.loads(out)["verify"]["problems"]}
    assert set(problems) == {"unet.onnx", "ort-cpu/vae_decoder.onnx", "tokenizer/vocab.json"}
    assert problems["ort-cpu/vae_decoder.onnx"] == "missing" and "sha256" in problems["unet.onnx"]
    assert "size" in problems["tokenizer/vocab.json"]
    code, out, _ = info(capsys, engines, "--verify")
    assert code == 1 and "3 of " in out and all(f"    {path}: " in out for path in problems)
    code, _, _ = info(capsys, engines)  # without --verify nothing is hashed: the report itself still works
    assert code == 0


def test_info_shows_merged_loras(tiny_engine_dir, tmp_path, capsys):
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["loras"] = [{"name": "pixel-art", "scale": 0.8}, "detail.safetensors"]
    (engines / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = info(capsys, engines)
    assert code == 0 and "  LoRAs       pixel-art (scale 0.8), detail.safetensors" in out


@pytest.mark.parametrize("case, needle", [("missing", "does not exist"), ("empty", "not an sdrt artifact"),
                                          ("bad-json", "not valid JSON"), ("foreign", "lacks")])
def test_info_bad_folders_exit_2_with_one_line(case, needle, tmp_path, capsys):
    folder = tmp_path / "dir"
    if case != "missing":
        folder.mkdir()
    if case == "bad-json":
        (folder / "manifest.json").write_text("{not json")
    if case == "foreign":
        (folder / "manifest.json").write_text(json.dumps({"name": "some other tool"}))
    code, out, err = info(capsys, folder, "--verify")
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("sdrt info: error: ") and needle in err


def test_version_lists_runtimes_without_importing_torch():
    import onnxruntime

    import sdrt

    code = ("import sys\nfrom sdrt import cli\ntry:\n    cli.main(['--version'])\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None)\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"sdrt {sdrt.__version__} (Python ")
    assert lines[1].startswith(f"onnxruntime {onnxruntime.__version__} (")
    assert all(p in lines[1] for p in onnxruntime.get_available_providers())
    for runtime in ("tensorrt", "tensorrt_rtx", "cupy", "openvino"):
        line = next(line for line in lines if line.startswith((runtime + " ", runtime + ":")))
        found = []
        for dist in DISTRIBUTIONS[runtime]:
            try:
                found.append(f"{runtime} {importlib.metadata.version(dist)} ({dist})")
            except importlib.metadata.PackageNotFoundError:
                pass
        assert line == (found[0] if found else f"{runtime}: not installed")
    assert lines[-1] == "no torch"


def test_info_names_the_tensorrt_version_and_gpu_of_recorded_engines(tiny_engine_dir, tmp_path, capsys):
    """An engines record as `sdrt build-engines --backend tensorrt` writes it (flavour, version, compute
    capability, ONNX digest, files): built / missing / stale components and the version installed here."""
    from sdrt.manifest import file_record

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, engines)
    (engines / "tensorrt").mkdir()
    manifest = load_manifest(engines)
    records = {}
    for name, digest in (("unet", manifest.onnx_digest("unet")), ("vae_decoder", "0" * 64)):
        (engines / "tensorrt" / f"{name}.engine").write_bytes(name.encode() * 1000)
        records[name] = {"flavour": "tensorrt", "version": "0.0.1-test", "compute_capability": "8.9",
                         "onnx_sha256": digest, "files": [file_record(engines, f"tensorrt/{name}.engine")]}
    data = dict(manifest.data, engines={"tensorrt": {"command": "sdrt build-engines ...", "flavour": "tensorrt",
                                                     "version": "0.0.1-test", "components": records}})
    (engines / "manifest.json").write_text(json.dumps(data))
    code, out, _ = info(capsys, engines, "--json", "--verify")
    trt = json.loads(out)["backends"]["tensorrt"]
    assert code == 0 and trt["built"] == ["unet", "vae_decoder"] and trt["missing"] == ["text_encoder", "vae_encoder"]
    assert trt["stale"] == ["vae_decoder"] and trt["compute_capability"] == "8.9" and trt["version"] == "0.0.1-test"
    assert trt["bytes"] == 4000 + 11000
    code, out, _ = info(capsys, engines)
    line = next(line for line in out.splitlines() if line.startswith("    tensorrt "))
    assert "engines for tensorrt 0.0.1-test; GPU compute capability 8.9: 2/4 components" in line
    assert "so these engines cannot run here" in line and "stale (built from an older ONNX): vae_decoder" in line
