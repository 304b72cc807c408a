"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cupy():
    """cupy with a usable CUDA device (the GPU loop's namespace); skips, saying why, where there is none."""
    try:
        import cupy

        cupy.zeros(1).sum().get()
    except Exception:  # not installed, or no driver / device
        pytest.skip("needs cupy and an NVIDIA GPU; none here")
    return cupy


@pytest.fixture
def opened(monkeypatch):
    """(file name relative to its ENGINE_DIR, graph optimization level) of every ONNX Runtime session created."""
    import onnxruntime

    calls, real = [], onnxruntime.InferenceSession

    class Spy(real):
        def __init__(self, path, options=None, *args, **kwargs):
            level = options.graph_optimization_level if options is not None else None
            calls.append((Path(str(path)).parent.name + "/" + Path(str(path)).name, level))
            super().__init__(path, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Spy)
    monkeypatch.delenv("SDRT_ORT_CACHE", raising=False)
    return calls


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight tiny SD pipeline folder (seed 0), built once per session. Do not modify it."""
    from sdrt_export.make_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", arch="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_model_dir, tmp_path_factory):
    """ENGINE_DIR of the tiny model (sizes 64..256, opt 128, max batch 2), exported once per session.
    Do not modify it (copy it first)."""
    from sdrt.specs import SizeRange
    from sdrt_export.exporter import export_model

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_model(tiny_model_dir, out, sizes=SizeRange(min_size=64, opt_size=128, max_size=256, max_batch=2),
                 progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_fp16_engine_dir(tiny_model_dir, tmp_path_factory):
    """fp16 ENGINE_DIR of the tiny model (sizes 64..256, opt 128, max batch 2), exported once per session
    with `sdrt export --precision fp16`. Do not modify it."""
    from sdrt.cli import main

    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--min-size", "64", "--max-size",
                 "256", "--opt-size", "128", "--max-batch", "2", "--precision", "fp16", "--json"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory):
    """A random-weight tiny SDXL pipeline folder (seed 0), built once per session. Do not modify it."""
    from sdrt_export.make_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_fp16_engine_dir(tiny_sdxl_model_dir, tmp_path_factory):
    """fp16 ENGINE_DIR of tiny-sdxl (sizes 64..128, max batch 2; the VAE stays fp32: force_upcast)."""
    from sdrt.specs import SizeRange
    from sdrt_export.exporter import export_model

    out = tmp_path_factory.mktemp("fp16") / "tiny-sdxl-fp16"
    export_model(tiny_sdxl_model_dir, out, sizes=SizeRange(64, 64, 128, 2), progress=False, precision="fp16")
    return out


@pytest.fixture(scope="session")
def family_exports(tmp_path_factory):
    """arch -> (model folder, ENGINE_DIR), each tiny arch built from its own folder (seed 0) and exported
    (sizes 64..128, max batch 2) on first use, once per session. Do not modify them (copy first)."""
    from sdrt.specs import SizeRange
    from sdrt_export.exporter import export_model
    from sdrt_export.make_model import make_model

    root, built = tmp_path_factory.mktemp("families"), {}

    def get(arch):
        if arch not in built:
            model = make_model(root / arch, arch=arch, seed=0)
            engines = root / f"{arch}-engines"
            export_model(model, engines, sizes=SizeRange(64, 64, 128, 2), progress=False)
            built[arch] = model, engines
        return built[arch]

    return get


@pytest.fixture(scope="session")
def kandinsky_exports(tmp_path_factory):
    """arch -> (model folder, ENGINE_DIR) of tiny-kandinsky22[-inpaint], made with `sdrt make-model` (seed 0) and
    exported with `sdrt export` (sizes 64..128, opt 64, max batch 2) on first use, once per session. Shared by
    tests/test_kandinsky.py and tests/test_kandinsky_export.py. Do not modify them (copy first)."""
    from sdrt.cli import main

    root, built = tmp_path_factory.mktemp("kandinsky"), {}

    def get(arch):
        if arch not in built:
            model, engines = root / arch, root / f"{arch}-engines"
            assert main(["make-model", str(model), "--arch", arch, "--seed", "0"]) == 0
            assert main(["export", "--model", str(model), "--out", str(engines), "--min-size", "64", "--opt-size",
                         "64", "--max-size", "128", "--max-batch", "2"]) == 0
            built[arch] = model, engines
        return built[arch]

    return get
