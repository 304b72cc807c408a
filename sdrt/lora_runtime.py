"""Run-time LoRA on ONNX Runtime, no re-export: merged weights from the artifact's base weights, per LoRA set.

For the active set of (file, weight) pairs, each component a LoRA touches gets a session of the exported ONNX with
only the changed initializers replaced: external-data ones through ``SessionOptions.add_external_initializers``,
ones inside the .onnx by patching their bytes in a copy of the file opened from memory (ORT refuses to replace
those as external, and ``add_initializer`` overrides are missed by the optimizers that fold weights, e.g.
MatMul+Add fusions: measured here, half the LoRA's effect lost). TensorRT engines built with ``--refit`` are
refitted in place instead (``refitted``; ``sdrt.backends.refit``). Merged weights are always
computed from the base weights the weight map locates in the ONNX (memory-mapped) plus the set's deltas, never
from a previous set's weights: switching A -> B -> A gives A exactly.

Memory policy: the base sessions (no LoRA) stay open as before; of LoRA sets, only the sessions of the set in use
are kept (each holding its merged copies of the changed weights), and switching sets closes the previous set's
sessions first. So memory is bounded by the base sessions plus one set's sessions, whatever the number of sets.
Components a set does not touch use the base session. One pipeline serves one set at a time (``activate`` per
request); concurrent requests with different sets need one pipeline each.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sdrt.lora import DELTA_SOURCE, LORA_COMPONENTS, LoraError, LoraMismatchError, check_weight, combine, \
    load_weight_map, read_lora
from sdrt.onnx_weights import Location

log = logging.getLogger(__name__)


def normalize(loras) -> tuple:
    """``[(path, weight), ...]`` -> a hashable tuple of (absolute path, float weight), files checked."""
    pairs = []
    for item in loras or ():
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise LoraError(f"loras must be (path, weight) pairs, got {item!r}")
        path, weight = item
        read_lora(path)
        pairs.append((str(Path(path).expanduser().absolute()), check_weight(weight)))
    return tuple(pairs)


class LoraSessions:
    """The active LoRA set of one pipeline and the engines opened for it (see the module docstring)."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.active: tuple = ()
        self._maps: dict = {}
        self._deltas: dict = {}
        self._engines: dict = {}
        self._refitted: dict = {}  # TensorRT: component -> the set its engine was refitted to

    def weight_map(self, component: str) -> dict:
        if component not in self._maps:
            self._maps[component] = load_weight_map(self.manifest, component)
        return self._maps[component]

    def targets(self) -> dict:
        """component -> {torch parameter: torch shape} from the weight maps (what a LoRA may touch)."""
        out = {}
        for name in LORA_COMPONENTS:
            if self.manifest.has(name):
                out[name] = {p: tuple(e["shape"][::-1] if e["transpose"] else e["shape"])
                             for p, e in self.weight_map(name).items()}
        return out

    def activate(self, loras) -> tuple:
        """Make ``loras`` the set in use; returns it normalized. Errors (files, keys, shapes) come here."""
        pairs = normalize(loras)
        if pairs == self.active:
            return pairs
        deltas = combine(pairs, self.targets(), self.manifest.family) if pairs else {}
        self._engines.clear()  # the previous set's sessions and merged weights go first (memory policy)
        self.active, self._deltas = pairs, deltas
        return pairs

    def touches(self, component: str) -> bool:
        return bool(self._deltas.get(DELTA_SOURCE.get(component, component)))

    def refitted(self, component: str, engine, backend: str):
        """TensorRT: ``engine`` (built with ``--refit``) refitted in place to the set in use, from base + deltas
        (``sdrt.backends.refit``; back to base when the set no longer touches it); other backends: ``engine``."""
        if not backend.startswith("tensorrt"):
            return engine
        want = self.active if self.touches(component) else ()
        if self._refitted.get(component, ()) != want:
            from sdrt.backends.refit import refit

            refit(engine, {k: v[0] for k, v in self.merged(component).items()} if want else {})
            self._refitted[component] = want
        return engine

    def engine(self, component: str, backend: str, threads: int | None):
        if component not in self._engines:
            self._engines[component] = self._open(component, backend, threads)
        return self._engines[component]

    def merged(self, component: str) -> dict:
        """{initializer name: (base + deltas, its weight-map entry)} for ``component`` (math in fp32, cast back to
        the initializer's dtype)."""
        changes = self._deltas[DELTA_SOURCE.get(component, component)]
        mapping = self.weight_map(component)
        records = self.manifest.component(component)["files"]
        files = {Path(r["path"]).name: self.manifest.root / r["path"] for r in records}
        missing = [p for p in changes if p not in mapping]
        if missing:
            raise LoraMismatchError(f"{component}: the artifact's weight map lacks {', '.join(missing[:3])} (not "
                                    "found once in the ONNX at export); merge this LoRA at export (sdrt export --lora)")
        out = {}
        for param, change in changes.items():
            entry = mapping[param]
            if entry["file"] not in files:
                raise LoraError(f"{component}: weight map names {entry['file']}, not a file of this component")
            shape = tuple(entry["shape"])
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize
            base = Location(entry["file"], int(entry["offset"]), size, entry["dtype"], shape).read(
                files[entry["file"]].parent)
            add = change.T if entry["transpose"] else change
            out[entry["initializer"]] = ((base.astype(np.float32) + add.reshape(shape)).astype(entry["dtype"]), entry)
        return out

    def _open(self, component: str, backend: str, threads: int | None):
        """The exported ONNX (the weight map describes it, not graphs build-engines optimized) with the merged
        weights: inline ones patched into a copy of the .onnx bytes, external-data ones handed to ONNX Runtime."""
        if not backend.startswith("ort-"):
            raise LoraError(f"run-time LoRA runs on the ort-cpu / ort-cuda / tensorrt backends, not {backend}; merge "
                            "the LoRA at export instead (sdrt export --lora FILE[:WEIGHT], then build-engines)")
        from sdrt.backends.ort import OrtEngine

        path = self.manifest.verified_path(component)
        merged = self.merged(component)
        inline = {k: v for k, v in merged.items() if v[1]["file"] == path.name}
        model = None
        if inline:
            data = bytearray(path.read_bytes())
            for array, entry in inline.values():
                raw = np.ascontiguousarray(array).tobytes()
                data[entry["offset"]: entry["offset"] + len(raw)] = raw
            model = bytes(data)
        log.info("%s: opening with LoRA %s", component, ", ".join(f"{Path(p).name}:{w:g}" for p, w in self.active))
        return OrtEngine(path, self.manifest.specs[component], device="cuda" if backend == "ort-cuda" else "cpu",
                         threads=threads, model_bytes=model,
                         initializers={k: v[0] for k, v in merged.items() if k not in inline} or None)
