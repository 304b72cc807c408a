"""ONNX graph clean-up (Polygraphy / ONNX-GraphSurgeon) and saving, for models below and above 2 GB.

``clean_up`` loads a raw ``torch.onnx.export`` output (with any external data beside it), folds
constants (Polygraphy's ``fold_constants``, which runs ONNX-GraphSurgeon's folder through ONNX
Runtime), removes dead nodes and sorts the graph (``cleanup().toposort()``), infers shapes and saves
the result: a single file for small models, or ``NAME.onnx`` plus ONE ``NAME.onnx.data`` file for
models over the protobuf limit. Nothing here serializes a >2 GB ``ModelProto`` in one piece:
Polygraphy's shape inference goes through a temporary file above its 2 GB threshold, constant
folding is skipped (with a log line) if ONNX Runtime cannot evaluate a partition, and the final save
moves the weights to the external data file before serializing.
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
    from polygraphy.backend.onnx import fold_constants, infer_shapes
    from polygraphy.logger import G_LOGGER

    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    onnxruntime.set_default_logger_severity(3)  # folding runs ORT sessions; keep their warnings quiet
    model = onnx.load(str(src), load_external_data=True)
    before = len(model.graph.node)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        model = fold_constants(model, num_passes=3, do_shape_inference=True, partitioning="basic",
                               size_threshold=FOLD_SIZE_THRESHOLD, allow_onnxruntime_shape_inference=False,
                               error_ok=True)
        graph = gs.import_onnx(model)
        del model
        graph.cleanup().toposort()
        model = gs.export_onnx(graph, do_type_check=False)
        del graph
        model = infer_shapes(model, error_ok=True, allow_onnxruntime=False)
    log.debug("%s: %d -> %d nodes after folding and clean-up", src.name, before, len(model.graph.node))
    return save(model, dst, external=initializer_bytes(model) > threshold)


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
