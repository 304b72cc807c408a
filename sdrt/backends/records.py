"""Engine records that the runtime writes itself (CPU-native ONNX Runtime graphs, OpenVINO compiled blobs):
the CPU identity they are valid for, and the manifest updated under a folder lock so that concurrent
processes never interleave files and records."""

from __future__ import annotations

import fcntl
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path

from sdrt.manifest import MANIFEST_NAME, write_json_atomic

# /proc/cpuinfo flags that choose a runtime's CPU kernels and layouts; the rest (mitigations, hypervisor
# bits) vary between hosts of one CPU kind without changing a compiled graph
ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "bmi", "popcnt", "vnni", "asimd", "sve", "neon", "i8mm",
                "bf16", "fp16", "dotprod")


def cpu_identity() -> dict:
    """This CPU as a runtime-written record names it: model name and the instruction-set flags, sorted."""
    found = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = (part.strip() for part in line.partition(":"))
                key = {"model name": "model", "flags": "flags", "features": "flags"}.get(key.lower())
                if key and key not in found:
                    found[key] = value
                if len(found) == 2:
                    break
    except OSError:
        pass
    flags = sorted({f for f in found.get("flags", "").split() if f.startswith(ISA_PREFIXES)})
    return {"model": found.get("model") or platform.processor() or platform.machine(), "flags": flags}


def writable(root: Path) -> bool:
    """Whether this process may add records to ENGINE_DIR ``root``."""
    return os.access(root, os.W_OK) and os.access(root / MANIFEST_NAME, os.W_OK)


@contextmanager
def locked_manifest(root: Path, folder: Path):
    """Hold an exclusive lock on ``folder`` (the backend's folder in ENGINE_DIR is the lock: no extra file)
    and yield the manifest's JSON as it is on disk now; it is written back atomically when the block ends
    without an error."""
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads((root / MANIFEST_NAME).read_text())
        yield data
        write_json_atomic(root / MANIFEST_NAME, data)
    finally:
        os.close(lock)
