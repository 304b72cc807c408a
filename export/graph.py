"""ONNX graph clean-up (Polygraphy / ONNX-GraphSurgeon) and saving, for models below and above 2 GB.

``clean_up`` loads a raw ``torch.onnx.export`` output (with any external data beside it), folds
constants (Polygraphy's ``fold_constants``, which runs ONNX-GraphSurgeon's folder through ONNX
Runtime), removes dead nodes and sorts the graph (``cleanup().toposort()``), infers shapes and saves
the result: a single file for small models, or ``NAME.onnx`` plus ONE ``NAME.onnx.data`` file for
models over the protobuf limit.

A source with external data (torch writes one file per weight above 2 GB) is cleaned without reading
its weights: the graph is loaded with the weights left external (ONNX-GraphSurgeon keeps such tensors
lazy), folding evaluates what it can without them (partitions that need a weight are skipped), and
the save streams each weight from its source file into the one data file, page-aligned so ONNX Runtime
can memory-map it. Loading every weight here held four copies of them at once (proto, GraphSurgeon,
the folding session, the re-export: 15 GiB for SD1.5's 3.4 GB UNet; benchmarks/NOTES.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)

# Above this many bytes of initializers a component is saved with one external data file. Below the
# 2 GiB protobuf limit with headroom for the graph itself; tests lower it to exercise that path.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Constant-folding results larger than this stay as computed nodes (folding must not bloat weights).
FOLD_SIZE_THRESHOLD = 16 << 20


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def clean_up(src: Path, dst: Path, external_data_threshold: int | None = None) -> list[str]:
    """Clean up the ONNX model at ``src`` and save it as ``dst``; return the written file names
    (the main ``.onnx`` first, then its external data file if any)."""
    import onnx_graphsurgeon as gs
    import onnxruntime
    from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
    from polygraphy.backend.onnx import fold_constants, infer_shapes
    from polygraphy.logger import G_LOGGER

    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    onnxruntime.set_default_logger_severity(3)  # folding runs ORT sessions; keep their warnings quiet
    model = onnx.load(str(src), load_external_data=False)
    weightless = has_external_data(model)
    before = len(model.graph.node)
    gs_severity, GS_LOGGER.severity = GS_LOGGER.severity, GS_LOGGER.CRITICAL  # per-partition folding failures
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            # weightless: a partition that needs a weight fails to evaluate; "recursive" skips just that one
            model = fold_constants(model, num_passes=3, do_shape_inference=True,
                                   partitioning="recursive" if weightless else "basic",
                                   size_threshold=FOLD_SIZE_THRESHOLD, allow_onnxruntime_shape_inference=False,
                                   error_ok=True)
            graph = gs.import_onnx(model)
            del model
            graph.cleanup().toposort()
            model = gs.export_onnx(graph, do_type_check=False)
            del graph
            model = infer_shapes(model, error_ok=True, allow_onnxruntime=False)
    finally:
        GS_LOGGER.severity = gs_severity
    log.debug("%s: %d -> %d nodes after folding and clean-up", src.name, before, len(model.graph.node))
    if weightless:
        return save_streaming(model, src.parent, dst)
    return save(model, dst, external=initializer_bytes(model) > threshold)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def save_streaming(model: onnx.ModelProto, base: Path, dst: Path, align: int = 4096) -> list[str]:
    """Save ``model``, whose weights are external files under ``base``, as ``dst`` + ONE data file: each
    weight is copied across on its own (plus any large folded tensor held in the proto), at offsets
    aligned to ``align`` bytes. Returns the file names, the main ``.onnx`` first."""
    location = dst.name + ".data"
    with open(dst.parent / location, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                data = _read_external(base, {e.key: e.value for e in tensor.external_data})
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                data = tensor.raw_data
            else:
                continue
            out.write(b"\0" * (-out.tell() % align))
            offset = out.tell()
            out.write(data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(dst))
    return [dst.name, location]


def _read_external(base: Path, info: dict) -> bytes:
    path = (base / info["location"]).resolve()
    if base.resolve() not in path.parents:
        raise ValueError(f"external data {info['location']!r} lies outside {base}")
    with open(path, "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        return handle.read(int(info["length"])) if "length" in info else handle.read()


def save(model: onnx.ModelProto, dst: Path, external: bool) -> list[str]:
    """Save ``model`` as ``dst`` (+ ``dst.name + '.data'`` when ``external``); return the file names."""
    if not external:
        onnx.save_model(model, str(dst))
        return [dst.name]
    location = dst.name + ".data"
    (dst.parent / location).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024, convert_attribute=False)
    return [dst.name, location]


def check_model(path: Path) -> None:
    """ONNX checker on the saved file (path-based, so it works with external data above 2 GB)."""
    onnx.checker.check_model(str(path), full_check=False)
