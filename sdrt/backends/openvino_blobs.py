"""OpenVINO compiled models kept in ENGINE_DIR/openvino/: one blob per component and input shape.

``compile_model`` (the CPU plugin's graph transforms, bf16 conversion and kernel choice) runs at the first
call of each shape and costs many seconds for a UNet, in every process: a one-shot ``sdrt txt2img
--backend openvino`` paid it on each image. The compiled model is saved with ``CompiledModel.export_model``
and recorded in the manifest (``engines.openvino``: OpenVINO version, this CPU, the plugin config, the digest
of the ONNX it was compiled from, and per shape the blob's file record); a later process checks the
blob's digest like any engine file and loads it with ``Core.import_model``. A record made by another
OpenVINO, CPU, config or ONNX is not used, and is replaced by the next compile. At most ``MAX_BLOBS`` shapes
are kept per component (the oldest is dropped). Nothing is written where ENGINE_DIR is read-only. Saving
holds the blob in memory once (OpenVINO exports to a BytesIO only); loading maps the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from sdrt.backends.records import cpu_identity, locked_manifest, writable
from sdrt.errors import ArtifactError
from sdrt.manifest import ENGINES_KEY, Manifest, file_record

log = logging.getLogger(__name__)

KEY = "openvino"  # the manifest's engines key and the folder in ENGINE_DIR
MAX_BLOBS = 4  # shapes kept per component (a UNet blob is its weights in the compiled precision)


def shape_tag(shapes: tuple) -> str:
    """A short stable name for one input-shape combination (``((name, shape), ...)``)."""
    text = json.dumps([[name, list(shape)] for name, shape in shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class BlobStore:
    """The compiled blobs of one component of one ENGINE_DIR, for one OpenVINO plugin config."""

    def __init__(self, manifest: Manifest, component: str, version: str, config: dict):
        self.manifest, self.component = manifest, component
        # version: the release (as pip and `sdrt info` name it); build: the full string blobs are tied to
        self.settings = {"flavour": "openvino", "version": version.split("-")[0], "build": version,
                         "cpu": cpu_identity(), "config": {k: str(v) for k, v in sorted(config.items())},
                         "onnx_sha256": manifest.onnx_digest(component)}

    def _current(self, data: dict) -> dict | None:
        """This component's record in manifest JSON ``data`` when it was made under these settings."""
        record = data.get(ENGINES_KEY, {}).get(KEY, {}).get("components", {}).get(self.component)
        if record and all(record.get(k) == v for k, v in self.settings.items()):
            return record
        return None

    def has_any(self) -> bool:
        record = self._current(self.manifest.data)
        return bool(record and record.get("blobs"))

    def load(self, shapes: tuple):
        """The checked blob compiled for ``shapes``, memory-mapped copy-on-write (OpenVINO takes it without a
        copy; it never writes it), or None (none recorded, or its file fails its digest)."""
        record = self._current(self.manifest.data)
        entry = record and record.get("blobs", {}).get(shape_tag(shapes))
        if not entry:
            return None
        file = next((f for f in record["files"] if f["path"] == entry["path"]), None)
        try:
            if file is None:
                raise ArtifactError(f"{entry['path']} is not among the record's files")
            self.manifest.check_file(file)
            return np.memmap(self.manifest.root / file["path"], dtype=np.uint8, mode="c")
        except (ArtifactError, OSError) as exc:
            log.warning("%s: its compiled OpenVINO blob is not used (%s); compiling again", self.component, exc)
            return None

    def save(self, shapes: tuple, compiled, precision: str, seconds: float) -> None:
        """Export ``compiled`` and record it for ``shapes`` (a no-op, logged, where ENGINE_DIR is read-only)."""
        root = self.manifest.root
        if not writable(root):
            log.info("%s: %s is read-only; the compiled OpenVINO model is not kept", self.component, root)
            return
        folder = root / KEY
        tag = shape_tag(shapes)
        rel = f"{KEY}/{self.component}.{tag}.blob"
        try:
            folder.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.component}.", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "wb") as handle:
                    blob = compiled.export_model()  # bytes, or a BytesIO in some OpenVINO releases
                    handle.write(blob.getbuffer() if hasattr(blob, "getbuffer") else blob)
                    del blob
                with locked_manifest(root, folder) as data:
                    os.replace(tmp, root / rel)
                    record = self._updated(data, tag, rel, shapes, precision, seconds)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: cannot keep the compiled OpenVINO model in %s (%s)", self.component, folder,
                        exc.strerror or exc)
            return
        self.manifest.data.setdefault(ENGINES_KEY, {}).setdefault(KEY, {"components": {}}) \
            .setdefault("components", {})[self.component] = record
        log.info("%s: kept its compiled OpenVINO model for %s in %s", self.component, dict(shapes), rel)

    def _updated(self, data: dict, tag: str, rel: str, shapes: tuple, precision: str, seconds: float) -> dict:
        """Add the blob to this component's record in ``data`` (a fresh record when the settings changed),
        dropping the oldest blobs past ``MAX_BLOBS`` and the files of a replaced record."""
        section = data.setdefault(ENGINES_KEY, {}).setdefault(KEY, {"command": None, "components": {}})
        components = section.setdefault("components", {})
        old = components.get(self.component) or {}
        record = self._current(data) or {**self.settings, "files": [], "blobs": {}}
        blobs = {t: e for t, e in record["blobs"].items() if t != tag}
        blobs[tag] = {"path": rel, "inputs": {name: list(shape) for name, shape in shapes}, "precision": precision,
                      "compile_seconds": round(seconds, 2), "written": time.time()}
        while len(blobs) > MAX_BLOBS:
            blobs.pop(min(blobs, key=lambda t: blobs[t]["written"]))
        keep = {e["path"] for e in blobs.values()}
        files = [f for f in record["files"] if f["path"] in keep and f["path"] != rel]
        record = {**record, "blobs": blobs, "files": [*files, file_record(self.manifest.root, rel)]}
        components[self.component] = record
        for file in old.get("files", []):  # blobs no record names any more
            if file["path"] not in keep:
                (self.manifest.root / file["path"]).unlink(missing_ok=True)
        return record
