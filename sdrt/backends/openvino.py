"""OpenVINO backend (CPU plugin): runs the artifact's own ONNX through OpenVINO's ONNX frontend.

``Core().read_model(onnx)`` then ``compile_model`` once per input shape (the model is reshaped to
static shapes first: OpenVINO's CPU kernels are faster on static shapes; a pipeline calls each
component with one shape per request). Precision: OpenVINO's own choice unless ``SDRT_OPENVINO_PRECISION``
(``f32``, ``bf16``, ``f16``) sets ``INFERENCE_PRECISION_HINT`` — in its default PERFORMANCE mode the CPU
plugin runs bf16 on CPUs with AVX512_BF16 (and AMX) and f32 elsewhere; ``precision`` reports what it
picked, so ``sdrt verify`` can use the bf16 tolerance. Each compiled shape is kept in ENGINE_DIR
(``openvino_blobs.py``), so later processes import it instead of compiling again (``SDRT_OPENVINO_CACHE=0``:
keep none).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from sdrt.errors import ArtifactError, InputError
from sdrt.specs import ComponentSpec

log = logging.getLogger(__name__)

PRECISION_ENV = "SDRT_OPENVINO_PRECISION"
CACHE_ENV = "SDRT_OPENVINO_CACHE"  # 0: compile in every process, keep no compiled model in ENGINE_DIR
PRECISIONS = ("f32", "bf16", "f16")
_COMPILED_SHAPES = 2  # compiled models kept per engine (one per distinct input shape, least recent dropped)


def _openvino():
    try:
        import openvino
    except ImportError:
        raise InputError("backend openvino needs the openvino package: pip install 'sdrt[openvino]'") from None
    return openvino


def requested_precision() -> str | None:
    value = os.environ.get(PRECISION_ENV, "").strip().lower() or None
    if value is not None and value not in PRECISIONS:
        raise InputError(f"{PRECISION_ENV}={value!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def default_precision() -> str:
    """The precision the CPU plugin would pick for a model on this CPU (``bf16`` or ``f32``)."""
    ov = _openvino()
    hint = requested_precision() or ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return _short(hint)


def _short(hint) -> str:
    """'bf16' / 'f32' / 'f16' from an ``openvino.Type`` or a hint string."""
    return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint).lower()


class OpenVinoEngine:
    """One component as an OpenVINO compiled model per input shape, called with the spec's input names."""

    def __init__(self, path: Path, spec: ComponentSpec, threads: int | None = None, manifest=None):
        """``manifest``: the artifact's, to keep compiled shapes in it (``openvino_blobs.BlobStore``)."""
        ov = _openvino()
        self.spec = spec
        self.core = ov.Core()
        self.config = {"INFERENCE_NUM_THREADS": int(threads or len(os.sched_getaffinity(0))),
                       "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if requested_precision():
            self.config["INFERENCE_PRECISION_HINT"] = requested_precision()
        self.path = Path(path)
        self._unchecked = manifest  # the ONNX files are checked against it before OpenVINO first reads them
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self.blobs = None
        if manifest is not None and os.environ.get(CACHE_ENV, "").strip() != "0":
            from sdrt.backends.openvino_blobs import BlobStore

            self.blobs = BlobStore(manifest, spec.name, ov.__version__, self.config)
        if self.blobs is None or not self.blobs.has_any():  # else the ONNX is read only if a shape needs it
            self._check_inputs(self._read())
        self._compiled: OrderedDict = OrderedDict()
        self.precision = default_precision()

    def _check_inputs(self, model) -> None:
        names = {name for port in model.inputs for name in port.get_names()}
        missing = set(self._dtypes) - names
        if missing:
            raise ArtifactError(f"{self.path} lacks inputs {sorted(missing)} that the {self.spec.name} spec names; "
                                "re-export")

    def _read(self):
        if self._unchecked is not None:
            self._unchecked.verified_path(self.spec.name)
            self._unchecked = None
        try:
            return self.core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises its own untyped errors for bad graphs
            raise ArtifactError(f"OpenVINO cannot read {self.path}: {exc}".splitlines()[0]) from None

    def _compile(self, shapes: tuple):
        if shapes in self._compiled:
            self._compiled.move_to_end(shapes)
            return self._compiled[shapes][:2]
        blob = self.blobs.load(shapes) if self.blobs else None
        compiled = self._import(blob, shapes) if blob is not None else None
        if compiled is None:
            blob, start = None, time.perf_counter()
            model = self._read()  # read again per shape: keeping the source model would hold a second weight copy
            self._check_inputs(model)
            model.reshape({name: list(shape) for name, shape in shapes})
            compiled = self.core.compile_model(model, "CPU", self.config)
            del model
            self.precision = _short(compiled.get_property("INFERENCE_PRECISION_HINT"))
            log.info("%s: OpenVINO compiled for %s, precision %s", self.spec.name, dict(shapes), self.precision)
            if self.blobs:
                self.blobs.save(shapes, compiled, self.precision, time.perf_counter() - start)
        request = compiled.create_infer_request()
        self._compiled[shapes] = (compiled, request, blob)  # an imported model may use the blob's pages
        while len(self._compiled) > _COMPILED_SHAPES:
            self._compiled.popitem(last=False)
        return compiled, request

    def _import(self, blob, shapes: tuple):
        """The compiled model from a checked blob (a read-only mapping), or None when OpenVINO refuses it."""
        ov = _openvino()
        try:
            compiled = self.core.import_model(ov.Tensor(blob, shared_memory=True), "CPU", self.config)
        except Exception as exc:  # OpenVINO's own untyped errors (a blob of another build)
            log.warning("%s: OpenVINO cannot import its compiled blob (%s); compiling again", self.spec.name,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
        self.precision = _short(compiled.get_property("INFERENCE_PRECISION_HINT"))
        log.info("%s: OpenVINO model for %s imported, precision %s", self.spec.name, dict(shapes), self.precision)
        return compiled

    def __call__(self, feeds: dict) -> dict:
        missing = [name for name in self._dtypes if name not in feeds]
        if missing:
            raise InputError(f"{self.spec.name}: missing input {missing[0]!r}")
        inputs = {name: np.ascontiguousarray(feeds[name], dtype=dtype) for name, dtype in self._dtypes.items()}
        compiled, request = self._compile(tuple((name, value.shape) for name, value in inputs.items()))
        results = request.infer(inputs)
        out = {}
        for name in self.spec.output_names:
            out[name] = np.array(results[compiled.output(name)], copy=True)
        return out
