"""The entry point: ``Pipeline(engine_dir)`` opens an ENGINE_DIR as the pipeline of its model's family.

Each family's orchestration lives in ``sdrt.pipelines`` (one module per family, one shared denoising loop);
``Pipeline`` reads the manifest and returns that family's pipeline, so callers never name the family.
"""

from __future__ import annotations

import os

from sdrt.manifest import load_manifest
from sdrt.pipelines.base import BasePipeline, Result, StepCallback, Timings
from sdrt.pipelines.stable_diffusion import (VAES, StableDiffusionPipeline, default_inpaint_strength,
                                             per_image_generator)

__all__ = ["BasePipeline", "Pipeline", "Result", "StableDiffusionPipeline", "StepCallback", "Timings", "VAES",
           "default_inpaint_strength", "per_image_generator"]


class Pipeline(StableDiffusionPipeline):
    """``Pipeline(engine_dir, backend="ort-cpu", threads=None, xp=None)``: the pipeline of the artifact's family.

    Stable Diffusion artifacts (SD1.x, SD2.x, SDXL, LCM) open as this class; other families return their
    own pipeline class from ``sdrt.pipelines`` with the same ``txt2img``/``img2img``/``inpaint`` API."""

    def __new__(cls, engine_dir: str | os.PathLike, *args, **kwargs):
        manifest = kwargs.get("manifest") or load_manifest(engine_dir)
        family_cls = family_pipeline(manifest)
        if family_cls is not StableDiffusionPipeline:
            return family_cls(engine_dir, *args, **{**kwargs, "manifest": manifest})
        self = super().__new__(cls)
        self._preloaded_manifest = manifest
        return self

    def __init__(self, engine_dir: str | os.PathLike, backend: str = "ort-cpu", threads: int | None = None,
                 xp=None, manifest=None):
        manifest = manifest or self.__dict__.pop("_preloaded_manifest", None)
        super().__init__(engine_dir, backend, threads, xp, manifest)


def family_pipeline(manifest) -> type:
    """The pipeline class for an artifact's model family (``dims.family`` in its manifest)."""
    if manifest.dims.family == "kandinsky22":  # sdrt.specs_kandinsky.FAMILY
        from sdrt.pipelines.kandinsky import KandinskyPipeline

        return KandinskyPipeline
    return StableDiffusionPipeline
