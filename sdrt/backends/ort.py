"""ONNX Runtime backend (CPU provider; CUDA provider with IO binding when onnxruntime-gpu is installed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.errors import ArtifactError, InputError
from sdrt.specs import ComponentSpec

log = logging.getLogger(__name__)


def session_options(threads: int | None) -> ort.SessionOptions:
    """Explicit session settings: all graph optimizations, sequential execution, CPU arena on."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.log_severity_level = 3
    return options


class OrtEngine:
    """One component as an ONNX Runtime session, called with the spec's input names."""

    def __init__(self, path: Path, spec: ComponentSpec, device: str = "cpu", threads: int | None = None):
        self.spec = spec
        self.device = device
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError("backend ort-cuda needs onnxruntime-gpu and a CUDA device; use ort-cpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}".splitlines()[0]) from None
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        missing = set(self._dtypes) - {i.name for i in self.session.get_inputs()}
        if missing:
            raise ArtifactError(f"{path} lacks inputs {sorted(missing)} that the {spec.name} spec names; re-export")

    def __call__(self, feeds: dict) -> dict:
        inputs = {name: np.ascontiguousarray(feeds[name], dtype=dtype) for name, dtype in self._dtypes.items()}
        if self.device == "cuda":
            return self._run_bound(inputs)
        outputs = self.session.run(self.spec.output_names, inputs)
        return dict(zip(self.spec.output_names, outputs))

    def _run_bound(self, inputs: dict) -> dict:
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        for name in self.spec.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.spec.output_names, binding.copy_outputs_to_cpu()))
