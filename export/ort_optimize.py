"""ort-* backends of ``sdrt build-engines``: ONNX graphs rewritten once by ONNX Runtime's optimizer, so a
session does not redo the rewriting at every load.

ORT_ENABLE_ALL output adds layout transforms tied to this CPU, so it is never saved. ort-cpu saves
ORT_ENABLE_EXTENDED (fusions into ONNX Runtime's contrib ops for the CPU provider); ort-cuda saves
EXTENDED with the CUDA provider when onnxruntime-gpu is installed and otherwise the hardware-neutral
BASIC level, since fusions made for the CPU provider would pin nodes to it. The level and providers
are recorded with each graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

EXTERNAL_DATA_MIN_BYTES = 1024  # initializers at least this big go to the .data file of a large graph


def plan(backend: str) -> dict:
    """What a build for ``backend`` does (and what its records hold)."""
    if backend == "ort-cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        level, providers = "ORT_ENABLE_EXTENDED", ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif backend == "ort-cuda":
        level, providers = "ORT_ENABLE_BASIC", ["CPUExecutionProvider"]
    else:
        level, providers = "ORT_ENABLE_EXTENDED", ["CPUExecutionProvider"]
    return {"flavour": "onnxruntime", "version": ort.__version__, "optimization_level": level,
            "providers": providers}


def optimize(src: Path, dst_dir: Path, name: str, settings: dict, external: bool) -> list[str]:
    """Write ``dst_dir/name.onnx`` (+ ``name.onnx.data`` when ``external``); return the file names."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["optimization_level"])
    options.optimized_model_filepath = str(dst_dir / f"{name}.onnx")
    options.log_severity_level = 3
    files = [f"{name}.onnx"]
    if external:
        files.append(f"{name}.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", files[1])
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(EXTERNAL_DATA_MIN_BYTES))
    session = ort.InferenceSession(str(src), options, providers=settings["providers"])
    del session
    return [f for f in files if (dst_dir / f).is_file()]
