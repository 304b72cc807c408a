"""ort-cpu graphs run diffusers' attention in ONNX Runtime's fused ``com.microsoft::MultiHeadAttention``
(``sdrt_export/attention_fusion.py``, applied by ``build-engines --backend ort-cpu``): one node per
attention module, no Softmax left, and the same outputs as the torch module (relative L2 <= the export
check's 1e-5) at a non-square batch-1 and a square batch-2 shape. The exported ONNX stays standard."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import pytest

from sdrt.backends import open_engine
from sdrt.manifest import load_manifest
from sdrt.specs import SizeRange, build_specs
from sdrt_export import build_engines as be
from sdrt_export import ort_optimize
from sdrt_export.checks import random_inputs, relative_error, run_torch
from sdrt_export.exporter import TOLERANCE, export_component
from sdrt_export.wrappers import dims_from_model, load_component

SIZES = SizeRange(min_size=64, opt_size=128, max_size=256, max_batch=2)  # = tiny_engine_dir's
SHAPES = [(1, 64, 88), (2, 64, 64)]  # (batch, height, width)


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def attention_modules(wrapper, name: str) -> int:
    """diffusers ``Attention`` modules the component runs (the VAE wrappers hold the whole VAE)."""
    from diffusers.models.attention_processor import Attention

    module = {"vae_decoder": "vae.decoder", "vae_encoder": "vae.encoder"}.get(name)
    root = wrapper.get_submodule(module) if module else wrapper
    return sum(isinstance(m, Attention) for m in root.modules())


def assert_matches_torch(wrapper, spec, run) -> None:
    rng = np.random.default_rng(1)
    for batch, height, width in SHAPES:
        arrays = random_inputs(spec, batch, height, width, rng)
        got = run(dict(zip(spec.input_names, arrays)))
        for name, want in zip(spec.output_names, run_torch(wrapper, arrays)):
            error = relative_error(got[name], want)
            assert error <= TOLERANCE, f"{spec.name} {name} at {batch}x{height}x{width}: relative L2 {error:.2e}"


def test_ort_cpu_build_fuses_every_attention_and_matches_torch(tiny_model_dir, tiny_engine_dir, tmp_path):
    out = shutil.copytree(tiny_engine_dir, tmp_path / "e")
    be.build_engines(tiny_model_dir, out, "ort-cpu", sizes=SIZES, progress=False)
    manifest = load_manifest(out)
    records = manifest.engines("ort-cpu")["components"]
    assert records["text_encoder"]["fused_attention"] == 0  # CLIP's causal-masked attention is left alone
    for name in ("unet", "vae_decoder"):
        path, _ = manifest.verified_engine("ort-cpu", name)
        ops, wrapper = op_counts(path), load_component(tiny_model_dir, name)
        assert records[name]["attention_fusion"] == ort_optimize.ATTENTION_FUSION
        assert ops["MultiHeadAttention"] == records[name]["fused_attention"] == attention_modules(wrapper, name) > 0
        assert ops["Softmax"] == 0
        assert op_counts(manifest.verified_path(name))["MultiHeadAttention"] == 0  # the export stays plain ONNX
        assert_matches_torch(wrapper, manifest.specs[name], open_engine(manifest, name, "ort-cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-sd2", "tiny-sdxl"])  # linear projections, per-level heads; SDXL's added conds
def test_family_unets_fuse_and_match_torch(arch, tmp_path):
    from sdrt_export.make_model import make_model

    model = make_model(tmp_path / arch, arch=arch, seed=0)
    spec = build_specs(dims_from_model(model))["unet"]
    (tmp_path / "e").mkdir()
    export_component(model, spec, tmp_path / "e", SIZES, opset=17)
    settings = ort_optimize.plan("ort-cpu")
    files, fields = ort_optimize.optimize(tmp_path / "e" / "unet.onnx", tmp_path, "unet", settings, external=False)
    wrapper = load_component(model, "unet")
    assert op_counts(tmp_path / files[0])["MultiHeadAttention"] == fields["fused_attention"] == \
        attention_modules(wrapper, "unet")
    from sdrt.backends.ort import OrtEngine

    assert_matches_torch(wrapper, spec, OrtEngine(tmp_path / files[0], spec))
