"""ENGINE_DIR/manifest.json: everything the runtime needs to know about an artifact directory.

The exporter (and later the engine builder) writes it; the runtime reads nothing but ENGINE_DIR.
Files are checked against their recorded digest before any engine is used: graphs before a backend parses
them; weight data files may be hashed while a session maps them (``sdrt.backends.ort``). BLAKE3 where the
record has one, else sha256 (manifests written before BLAKE3 was recorded; records keep sha256 too); the
digest helpers live in ``sdrt.digests`` and are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.digests import _digest, _file_key, _lower_priority, files_digest
from sdrt.digests import blake3_file, file_record, sha256_file  # noqa: F401 - re-exported
from sdrt.errors import ArtifactError
from sdrt.specs import COMPONENTS, OPTIONAL_COMPONENTS, ModelDims, ModelSpecs, SizeRange, build_specs, \
    control_components
from sdrt.specs_kandinsky import CONSTANTS_KEY, KANDINSKY_COMPONENTS

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ENGINES_KEY = "engines"  # optional: {backend: {"command": ..., "components": {name: record}}}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temp file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        if path.exists():  # mkstemp makes 0600; keep the mode of the file being replaced
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict
    # relpath -> Future of ``_digest``: checks started ahead of use by ``verify_ahead``
    _ahead: dict = field(default_factory=dict, compare=False, repr=False)
    # set once the txt2img components' check-ahead has started (an engine opened later must not re-hash them)
    _ahead_started: list = field(default_factory=list, compare=False, repr=False)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_dict(self.data["dims"])

    @property
    def specs(self) -> ModelSpecs:
        return build_specs(self.dims)

    @property
    def sizes(self) -> SizeRange:
        return SizeRange.from_dict(self.data["sizes"])

    @property
    def family(self) -> str:
        return self.data["family"]

    @property
    def scheduler_config(self) -> dict:
        return dict(self.data["scheduler"])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.data["vae"]["scaling_factor"])

    @property
    def vae_shift_factor(self) -> float:
        return float(self.data["vae"].get("shift_factor") or 0.0)

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.data["tokenizer"]["dir"]

    @property
    def tokenizer_2_dir(self) -> Path | None:
        """SDXL's second tokenizer (pads with its own token), None for one-encoder models."""
        section = self.data.get("tokenizer_2")
        return self.root / section["dir"] if section else None

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """diffusers' SDXL rule: no negative prompt means zero negative embeddings, not encoded ""."""
        return bool(self.data.get("pipeline", {}).get("force_zeros_for_empty_prompt", False))

    def has(self, component: str) -> bool:
        return component in self.data["components"]

    def constant(self, name: str):
        """A constant array the exporter computed (Kandinsky's negative_image_embeds, clip_mean, clip_std),
        float32, after checking its file against the manifest."""
        import numpy as np

        record = self.data.get(CONSTANTS_KEY, {}).get(name)
        if not record:
            raise ArtifactError(f"{self.root} has no constant {name} in its manifest; re-run `sdrt export --force`")
        self.check_file(record)
        try:
            return np.load(self.root / record["path"], allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {self.root / record['path']} ({exc}); re-run `sdrt export --force`") \
                from None

    def component(self, name: str) -> dict:
        try:
            return self.data["components"][name]
        except KeyError:
            raise ArtifactError(f"{self.root} has no {name} component in its manifest") from None

    def verified_path(self, name: str) -> Path:
        """Path of a component's main file, after checking every file it uses against the manifest."""
        entry = self.component(name)
        for record in entry["files"]:
            self.check_file(record)
        return self.root / entry["files"][0]["path"]

    def check_file(self, record: dict, fix: str | None = None) -> None:
        """Raise ``ArtifactError`` unless the file exists and matches its recorded size and digest. A check
        started by ``verify_ahead`` is waited for and counts only if the file is unchanged since it read it."""
        path = self.root / record["path"]
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; {fix or f're-run `sdrt export` to rebuild {self.root}'}")
        ahead = self._ahead.pop(record["path"], None)
        try:
            ok, key = ahead.result() if ahead is not None else (None, None)
        except OSError:
            ok = None
        if ok is None or key != _file_key(path):
            ok, _ = _digest(path, record)
        if not ok:
            raise ArtifactError(
                f"{path} does not match its sha256/BLAKE3 digest in {MANIFEST_NAME} (modified or corrupt); "
                f"{fix or f're-run `sdrt export --force` to rebuild {self.root}'}"
            )

    def verify_ahead(self, records: list[dict], threads: int = 1) -> None:
        """Start checking these files on a background thread, in order, so the check of one component
        overlaps the session creation of the one before; ``check_file`` then waits for the result. The
        outcome is only used by ``check_file``: a file is never handed to a backend unchecked."""
        todo = [(r, Future()) for r in records if r["path"] not in self._ahead and (self.root / r["path"]).is_file()]
        if not todo:
            return
        for record, future in todo:
            self._ahead[record["path"]] = future

        def run():
            _lower_priority()
            for record, future in todo:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(_digest(self.root / record["path"], record, threads))
                    except BaseException as exc:  # noqa: BLE001 - handed to check_file, which rechecks
                        future.set_exception(exc)

        threading.Thread(target=run, name="sdrt-verify", daemon=True).start()

    def onnx_digest(self, name: str) -> str:
        """One sha256 for a component's ONNX files (its own when it has one file)."""
        return files_digest(self.component(name)["files"])

    def engines(self, backend: str) -> dict:
        """The ``engines`` section for one backend (``{}`` when none was built)."""
        return self.data.get(ENGINES_KEY, {}).get(backend) or {}

    def rebuild_command(self, backend: str) -> str:
        """The ``sdrt build-engines`` command that (re)builds this backend's engines."""
        recorded = self.engines(backend).get("command")
        if recorded:
            return recorded
        source = self.data.get("source", {}).get("path", "MODEL_DIR")
        prior = self.data.get("source", {}).get("prior")  # Kandinsky 2.2 exported from DECODER + --prior PRIOR
        return shlex.join(["sdrt", "build-engines", "--model", source, *(["--prior", prior] if prior else []),
                           "--out", str(self.root), "--backend", backend])

    def verified_engine(self, backend: str, name: str) -> tuple[Path, dict]:
        """A component's engine file and record, after checking that the record exists, was built from
        this artifact's ONNX and that every file matches its sha256. Nothing is deserialized here."""
        fix = f"rebuild with `{self.rebuild_command(backend)}`"
        record = self.engines(backend).get("components", {}).get(name)
        if not record:
            raise ArtifactError(f"{self.root} has no {backend} engine for {name}; build it with "
                                f"`{self.rebuild_command(backend)}`")
        if record.get("onnx_sha256") != self.onnx_digest(name):
            raise ArtifactError(f"the {backend} {name} engine in {self.root} was built from another ONNX file; {fix}")
        for file in record["files"]:
            self.check_file(file, fix)
        return self.root / record["files"][0]["path"], record


_REQUIRED = ("format_version", "family", "dims", "sizes", "components", "scheduler", "tokenizer", "vae")


def load_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """Read and validate ENGINE_DIR/manifest.json; raise ``ArtifactError`` with a fix on any problem."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise ArtifactError(f"engine directory {root} does not exist; create it with `sdrt export`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}; it is not an sdrt artifact (run `sdrt export`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run `sdrt export --force`") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; re-run `sdrt export --force`")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; re-run `sdrt export --force`")
    if data["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {data['format_version']}, this sdrt reads {FORMAT_VERSION}; "
            "re-export with this sdrt"
        )
    try:
        _validate(data)
        manifest = Manifest(root, data)
        manifest.specs, manifest.sizes  # noqa: B018 - validates dims and sizes
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ArtifactError(f"{path} is malformed ({exc}); re-run `sdrt export --force`") from None
    return manifest


def _section(data: dict, key: str) -> dict:
    if not isinstance(data[key], dict):
        raise TypeError(f"{key} is not a JSON object")
    return data[key]


def _validate(data: dict) -> None:
    """Types of everything the runtime reads later, so a bad manifest fails here and not mid-generation."""
    for key, value in _section(data, "dims").items():
        if key in ModelDims.__dataclass_fields__ and key not in ("family", "control_residuals") \
                and value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"dims.{key} must be a positive integer, got {value!r}")
    _section(data, "sizes")
    _section(data, "scheduler")
    for key in ("tokenizer", "tokenizer_2"):
        if (key in data or key == "tokenizer") and not isinstance(_section(data, key).get("dir"), str):
            raise ValueError(f"{key} has no dir")
    vae = _section(data, "vae")
    for key in ("scaling_factor", "shift_factor"):
        value = vae.get(key)
        if (value is not None or key == "scaling_factor") and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
            raise ValueError(f"vae.{key} must be a finite number, got {value!r}")
    for name, entry in _section(data, "components").items():
        if name not in COMPONENTS + OPTIONAL_COMPONENTS + KANDINSKY_COMPONENTS + control_components(data["dims"]) \
                or not isinstance(entry, dict) \
                or not entry.get("files") \
                or not isinstance(entry["files"], list):
            raise ValueError(f"bad component entry {name!r}")
        for record in entry["files"]:
            _validate_file(record, f"component {name}")
    for name, record in data.get(CONSTANTS_KEY, {}).items():
        _validate_file(record, f"constant {name}")
    _validate_engines(data.get(ENGINES_KEY, {}))


def _validate_file(record, owner: str) -> None:
    """One file record: a JSON object whose path lies inside the artifact, with a sha256 and a size."""
    if not isinstance(record, dict):
        raise ValueError(f"{owner} has a file entry that is not a JSON object")
    relpath = record["path"]
    if not isinstance(relpath, str) or Path(relpath).is_absolute() or ".." in Path(relpath).parts:
        raise ValueError(f"{owner} file path {relpath!r} is not inside the artifact")
    if not isinstance(record["sha256"], str):
        raise ValueError(f"{owner} file {relpath} has no sha256")
    if not isinstance(record.get("blake3", ""), str):
        raise ValueError(f"{owner} file {relpath} has a blake3 that is not a string")
    int(record["size"])


def _validate_engines(engines) -> None:
    """The optional ``engines`` section: every engine file record lies inside the artifact and has a sha256."""
    if not isinstance(engines, dict):
        raise TypeError(f"{ENGINES_KEY} is not a JSON object")
    for backend, section in engines.items():
        components = section.get("components") if isinstance(section, dict) else None
        if not isinstance(components, dict):
            raise ValueError(f"{ENGINES_KEY}.{backend} has no components object")
        for name, record in components.items():
            files = record.get("files") if isinstance(record, dict) else None
            if not files or not isinstance(files, list):
                raise ValueError(f"{backend} engine {name} has no file list")
            for file in files:
                _validate_file(file, f"{backend} engine {name}")
