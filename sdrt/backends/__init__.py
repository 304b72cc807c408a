"""Backends: one protocol, ``engine(feeds: dict[str, array]) -> dict[str, array]``.

Backends run one component each and know nothing about guidance, schedulers or images.
"""

from __future__ import annotations

from typing import Protocol

from sdrt.errors import InputError
from sdrt.manifest import Manifest

BACKENDS = ("ort-cpu", "ort-cuda")


class Engine(Protocol):
    def __call__(self, feeds: dict) -> dict: ...


def open_engine(manifest: Manifest, component: str, backend: str = "ort-cpu", threads: int | None = None) -> Engine:
    """Open one component of an ENGINE_DIR after checking its files against the manifest."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    path = manifest.verified_path(component)
    from sdrt.backends.ort import OrtEngine

    return OrtEngine(path, manifest.specs[component], device="cuda" if backend == "ort-cuda" else "cpu",
                     threads=threads)
