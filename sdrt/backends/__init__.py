"""Backends: one protocol, ``engine(feeds: dict[str, array]) -> dict[str, array]``.

Backends run one component each and know nothing about guidance, schedulers or images. The ort-*
backends run the exported ONNX, or the graphs ``sdrt build-engines`` optimized for them when the
manifest records some; tensorrt / tensorrt-rtx run built engines only (see ``tensorrt.py``); openvino runs
the exported ONNX through OpenVINO (see ``openvino.py``).
"""

from __future__ import annotations

import logging
from typing import Protocol

from sdrt.errors import InputError
from sdrt.manifest import Manifest

log = logging.getLogger(__name__)

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt", "tensorrt-rtx", "openvino")


class Engine(Protocol):
    def __call__(self, feeds: dict) -> dict: ...


def open_engine(manifest: Manifest, component: str, backend: str = "ort-cpu", threads: int | None = None,
                cuda_graph: bool = False) -> Engine:
    """Open one component of an ENGINE_DIR after checking its files against the manifest."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend.startswith("tensorrt"):
        from sdrt.backends.tensorrt import open_tensorrt

        return open_tensorrt(manifest, component, backend, cuda_graph=cuda_graph)
    if backend == "openvino":  # the exported ONNX through OpenVINO's CPU plugin (bf16 on AVX512_BF16 CPUs)
        from sdrt.backends.openvino import OpenVinoEngine

        path = manifest.root / manifest.component(component)["files"][0]["path"]  # checked before it is read
        return OpenVinoEngine(path, manifest.specs[component], threads=threads, manifest=manifest)
    from sdrt.backends.ort import open_ort

    return open_ort(manifest, component, backend, threads)
