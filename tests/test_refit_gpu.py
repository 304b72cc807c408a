"""TensorRT refit on a GPU (``make gpu-test``): engines built with ``sdrt build-engines --refit`` for real,
refitted with run-time LoRA weights, against ONNX Runtime given the same weights; back to base and A -> base -> A.
Skips, saying why, without an NVIDIA GPU, CUDA and tensorrt / tensorrt_rtx (the CPU side: test_refit.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from tests.gpu_trt import trt_gpu_backend

from sdrt.manifest import load_manifest
from sdrt.specs import SizeRange

SIZES = SizeRange(min_size=64, opt_size=128, max_size=256, max_batch=2)  # = tiny_engine_dir's
LORA = ("text_encoder", "unet")


GPU_BACKEND, WHY_NOT = trt_gpu_backend()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU_BACKEND is None, reason=WHY_NOT)]


@pytest.fixture()
def refittable(tiny_model_dir, tiny_engine_dir, tmp_path):
    """A copy of tiny_engine_dir with refittable engines built for this machine's GPU."""
    from sdrt_export.build_engines import build_engines

    out = tmp_path / "e"
    shutil.copytree(tiny_engine_dir, out)
    if not all(load_manifest(out).component(c).get("weight_map") for c in LORA):
        pytest.skip("this export wrote no weight maps (an sdrt export without run-time LoRA)")
    build_engines(tiny_model_dir, out, GPU_BACKEND, sizes=SIZES, progress=False, refit=True)
    return load_manifest(out)


def _initializer_arrays(path) -> dict:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_refitted_engine_matches_onnx_runtime_with_the_same_weights_and_restores_base(refittable):
    import onnxruntime as ort

    from sdrt.backends import open_engine
    from sdrt_export.checks import random_inputs, relative_error

    manifest = refittable
    spec = manifest.specs["unet"]
    engine = open_engine(manifest, "unet", GPU_BACKEND, cuda_graph=True)
    assert engine.engine.refittable
    names = set(engine.trt.Refitter(engine.engine, engine.trt.Logger(engine.trt.Logger.WARNING)).get_all_weights())
    assert set(engine.refit_plan.weights) <= names
    feeds = dict(zip(spec.input_names, random_inputs(spec, 2, 64, 64, np.random.default_rng(0))))
    base_out = engine(feeds)["out_sample"]
    rng = np.random.default_rng(1)
    initializers = _initializer_arrays(manifest.verified_path("unet"))
    changed = {}
    for name in sorted(engine.refit_plan.weights)[::3]:  # a third of the weights, as a LoRA would change them
        array = initializers[name]
        changed[name] = (array + 0.05 * rng.standard_normal(array.shape)).astype(array.dtype)
    options = ort.SessionOptions()
    options.add_external_initializers(list(changed), [ort.OrtValue.ortvalue_from_numpy(a) for a in changed.values()])
    session = ort.InferenceSession(str(manifest.verified_path("unet")), options, providers=["CPUExecutionProvider"])
    want = session.run(["out_sample"], feeds)[0]
    engine.refit(changed)
    got = engine(feeds)["out_sample"]
    assert relative_error(got, want) <= 1e-3 and relative_error(got, base_out) > 1e-2
    engine.refit({})
    np.testing.assert_array_equal(engine(feeds)["out_sample"], base_out)  # back to base: the base engine
    engine.refit(changed)
    np.testing.assert_array_equal(engine(feeds)["out_sample"], got)  # A -> base -> A gives A


def test_refitted_pipeline_image_matches_the_ort_runtime_lora_image(refittable, tiny_model_dir, tmp_path):
    """``loras=`` on the TensorRT pipeline (engines refitted in place, sdrt.lora_runtime) vs the same LoRA at run
    time on ort-cpu (a random kohya LoRA on the UNet and the text encoder); then no LoRA, then the LoRA again."""
    from sdrt.pipeline import Pipeline
    from sdrt_export.lora_random import write_random_lora

    lora = write_random_lora(tiny_model_dir, tmp_path / "a.safetensors", components=("unet", "text_encoder"))
    request = dict(prompt="a cat", steps=3, seed=0, width=64, height=64)
    ort_pipe = Pipeline(refittable.root, backend="ort-cpu")
    want_lora = ort_pipe.txt2img(**request, loras=[(str(lora), 0.8)]).unit_images
    want_base = ort_pipe.txt2img(**request).unit_images
    assert np.abs(want_lora - want_base).max() > 1e-2  # the LoRA changes the image

    pipe = Pipeline(refittable.root, backend=GPU_BACKEND)
    got_lora = pipe.txt2img(**request, loras=[(str(lora), 0.8)]).unit_images
    assert np.abs(got_lora - want_lora).max() <= 5e-3
    assert np.abs(pipe.txt2img(**request).unit_images - want_base).max() <= 5e-3  # back to base
    again = pipe.txt2img(**request, loras=[(str(lora), 0.8)]).unit_images
    np.testing.assert_array_equal(again, got_lora)  # A -> base -> A gives A
