"""``sdrt export --resume``: keep the components that were exported and checked when an export fails or is
interrupted, and reuse them on the next run with the same inputs.

Without ``--resume`` an export builds in a random temporary sibling that is deleted on any failure (never a
half-written ENGINE_DIR). With it, the staging folder is the fixed hidden sibling ``.OUT.partial``, holding a
``progress.json`` that records, after each component has passed its parity check, that component's result and
its files' records (size, sha256, BLAKE3). A later ``--resume`` run whose inputs give the same key (the model,
tiny-VAE and ControlNet folders' file listings, the LoRA digests, sizes, opset, precision, sdrt and library
versions, this CPU) re-checks each recorded file's digest and skips the components that match; anything else in
the folder is deleted. On success the folder is renamed into place like any export; a key that differs (other
settings, a changed model) discards the partial export and starts over.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from sdrt.digests import file_matches, file_record
from sdrt.errors import ExportError, SdrtError
from sdrt.manifest import write_json_atomic
from sdrt_export.folders import visible_files

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
VERSION = 1


def partial_dir(out: Path) -> Path:
    """Where ``--resume`` stages ``out`` (a hidden sibling, like the temporary folder of a plain export)."""
    return out.parent / f".{out.name}.partial"


def folder_listing(path: Path | None) -> list:
    """A folder's files as (relative path, size, mtime ns), hidden entries skipped: a cheap stand-in for its
    content hash (the manifest still records the sha256 of the whole folder at the end)."""
    if path is None:
        return []
    return [[rel, file.stat().st_size, file.stat().st_mtime_ns] for rel, file in visible_files(path)]


def plan_key(**inputs) -> str:
    """sha256 of everything a component's export depends on (JSON-able values)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Partial:
    """The staging folder of one ``--resume`` export (held under an exclusive lock while it runs)."""

    def __init__(self, out: Path, key: str):
        self.root, self.key = partial_dir(out), key
        self.components: dict[str, dict] = {}
        self._lock = None

    def open(self) -> Path:
        """Take the folder (creating it, or discarding one made for other inputs); return it."""
        self.root.mkdir(exist_ok=True)
        self._lock = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ExportError(f"another `sdrt export --resume` is writing {self.root}; wait for it to end") from None
        progress = self._read()
        if progress is None:
            if any(self.root.iterdir()):
                log.warning("%s was made for other inputs (model, settings or versions); starting over", self.root)
            self._clear(keep=set())
        else:  # what a killed run left half-written (its scratch, the component it was on) goes
            self.components = progress["components"]
            self._clear(keep=self._recorded() | {PROGRESS})
        return self.root

    def _read(self) -> dict | None:
        try:
            data = json.loads((self.root / PROGRESS).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != VERSION or data.get("key") != self.key \
                or not isinstance(data.get("components"), dict):
            return None
        return data

    def reuse(self, name: str) -> dict | None:
        """The recorded result of ``name`` when every one of its files still matches its record, else None."""
        entry = self.components.get(name)
        if entry is None:
            return None
        for record in entry["records"].values():
            path = self.root / record["path"]
            if not path.is_file() or not file_matches(path, record):
                log.warning("%s: %s changed since it was checked; exporting %s again", self.root, record["path"], name)
                del self.components[name]
                return None
        log.info("%s: reusing the checked export from %s", name, self.root)
        return entry["result"]

    def record(self, name: str, result: dict) -> None:
        """Note ``name`` as exported and checked: its files' records, then the progress file (atomically)."""
        native = (result.get("native") or {}).get("files", [])
        records = {rel: file_record(self.root, rel) for rel in [*result["files"], *native]}
        self.components[name] = {"result": result, "records": records}
        write_json_atomic(self.root / PROGRESS, {"version": VERSION, "key": self.key, "components": self.components})

    def file_record(self, root: Path, rel: str) -> dict:
        """``sdrt.digests.file_record``, from the record made when the component was checked if there is one."""
        for entry in self.components.values():
            if rel in entry["records"]:
                return entry["records"][rel]
        return file_record(root, rel)

    def finish(self) -> None:
        """Before the folder becomes the artifact: drop the progress file."""
        (self.root / PROGRESS).unlink(missing_ok=True)

    def keep(self, exc: BaseException) -> None:
        """After a failure: delete everything but the recorded components, and say how to continue."""
        self._clear(keep=self._recorded() | {PROGRESS})
        done = ", ".join(self.components) or "none"
        hint = f"checked components kept in {self.root} ({done}): rerun with --resume to continue"
        if isinstance(exc, SdrtError) and exc.args:
            exc.args = (f"{exc.args[0]}; {hint}", *exc.args[1:])
        else:
            log.warning("%s", hint)
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _recorded(self) -> set[str]:
        return {rel for entry in self.components.values() for rel in entry["records"]}

    def _clear(self, keep: set[str]) -> None:
        for path in sorted(self.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            rel = path.relative_to(self.root).as_posix()
            if path.is_dir() and not path.is_symlink():
                if not any(k.startswith(rel + "/") for k in keep):
                    shutil.rmtree(path, ignore_errors=True)
            elif rel not in keep:
                path.unlink(missing_ok=True)
