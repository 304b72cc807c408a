"""File digests for artifact records: sha256 and BLAKE3 (the ``blake3`` package, multithreaded over a
memory map; 3-4x sha256's speed per core, benchmarks/NOTES.md), and the low priority a check thread runs
at. ``sdrt.manifest`` re-exports them."""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
from pathlib import Path

try:
    import blake3 as _blake3
except ImportError:  # an old install without the dependency: sha256 checks only
    _blake3 = None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def blake3_file(path: str | os.PathLike, threads: int | None = None) -> str:
    """BLAKE3 of a file, memory-mapped, on ``threads`` threads (default: as many as it likes)."""
    return _blake3.blake3(max_threads=threads or _blake3.blake3.AUTO).update_mmap(str(path)).hexdigest()


def file_record(root: Path, relpath: str) -> dict:
    """The manifest's entry for one file: path relative to ENGINE_DIR, sha256, BLAKE3 (when the package is
    installed) and size. Both digests come from one read of the file, each on its own thread."""
    path = root / relpath
    record = {"path": relpath, "size": path.stat().st_size}
    if _blake3 is None or record["size"] == 0:  # (an empty file cannot be memory-mapped)
        record["sha256"] = sha256_file(path)
        if _blake3 is not None:
            record["blake3"] = _blake3.blake3().hexdigest()
        return record
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        side = threading.Thread(target=lambda: record.update(sha256=hashlib.sha256(view).hexdigest()))
        side.start()  # hashlib releases the GIL on large buffers, so both digests run at once
        record["blake3"] = _blake3.blake3(view, max_threads=_blake3.blake3.AUTO).hexdigest()
        side.join()
    return record


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _digest(path: Path, record: dict, threads: int | None = None) -> tuple[bool, tuple]:
    """(whether ``path`` matches the record's digest, the file's identity when it was read)."""
    key = _file_key(path)
    if key[2] != record["size"]:
        return False, key
    if _blake3 is not None and isinstance(record.get("blake3"), str):
        return blake3_file(path, threads) == record["blake3"], key
    return sha256_file(path) == record["sha256"], key


def file_matches(path: Path, record: dict) -> bool:
    """Whether ``path`` has the size and digest (BLAKE3 where recorded and installed, else sha256) of ``record``."""
    return _digest(Path(path), record)[0]


def files_digest(files: list[dict]) -> str:
    """One sha256 for a list of file records (the file's own when there is one)."""
    if len(files) == 1:
        return files[0]["sha256"]
    return hashlib.sha256("".join(f"{r['path']}\0{r['sha256']}\n" for r in files).encode()).hexdigest()


def _lower_priority(niceness: int = 10) -> None:
    """Make the calling thread yield to the engines' compute threads (Linux: per-thread nice value), so a
    check running ahead fills a core they leave idle instead of slowing an engine call down."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except OSError:
            pass
