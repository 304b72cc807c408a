"""One component's ONNX -> one serialized engine with the TensorRT (or TensorRT-RTX) Python builder API.

Both flavours share the Builder/OnnxParser/BuilderConfig API; the module is imported lazily by
``backend``. Networks are strongly typed, so an engine computes in the types its ONNX declares (an
fp16 artifact gives an fp16 engine; no precision flags). TensorRT tunes kernels on this machine's GPU
and keeps a timing cache; TensorRT-RTX compiles ahead of time without a GPU for target compute
capabilities (its timing cache is a no-op; its runtime cache lives on the runtime side).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import numpy as np

from sdrt.errors import ExportError, InputError
from sdrt.specs import ComponentSpec

log = logging.getLogger(__name__)

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
LABELS = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
PACKAGES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx"}
DEFAULT_TARGETS = "default"  # TensorRT-RTX's own choice of compute capabilities


@dataclass(frozen=True)
class BuildOptions:
    builder_level: int = 3
    workspace_gb: float | None = None  # None: the flavour's default limit
    targets: tuple[str, ...] = ()  # TensorRT-RTX compute capabilities ("SM86", ...); () = its default

    def to_dict(self) -> dict:
        return {"builder_level": self.builder_level, "workspace_gb": self.workspace_gb}


def import_flavour(backend: str):
    """The ``tensorrt`` or ``tensorrt_rtx`` module (``ExportError`` naming the package when missing)."""
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as exc:
        raise ExportError(f"backend {backend} needs the {MODULES[backend]} package ({exc}): "
                          f"pip install {PACKAGES[backend]}") from None


def make_logger(trt):
    """A TensorRT logger that forwards to ``logging`` and keeps the errors for the one-line message."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.ERROR:
                self.errors.append(msg)
            if severity <= trt.ILogger.WARNING:
                log.debug("%s: %s", trt.__name__, msg)

    return Logger()


def rtx_targets(trt, requested: str | None) -> tuple[str, ...]:
    """Normalize ``sm86,8.9,SM120`` to the flavour's ``ComputeCapability`` names; ``None`` -> ()."""
    if not requested:
        return ()
    known = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
    names = []
    for item in requested.split(","):
        name = "SM" + item.strip().upper().removeprefix("SM").replace(".", "")
        if name not in known:
            raise InputError(f"unknown GPU target {item.strip()!r}; TensorRT-RTX {trt.__version__} builds for "
                             f"{', '.join(n.lower() for n in known)}")
        names.append(name)
    return tuple(dict.fromkeys(names))


def parse_network(trt, builder, logger, onnx_path):
    """Strongly typed network from an ONNX file (external data beside it is found by path)."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)] or logger.errors or ["?"]
        raise ExportError(f"cannot parse {onnx_path}: {errors[0]}".splitlines()[0])
    return network, parser


def network_io(trt, network) -> dict:
    """Name -> dtype, shape (-1 = dynamic) and mode of every network input and output."""
    io = {}
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            io[tensor.name] = {"mode": mode, "dtype": np.dtype(trt.nptype(tensor.dtype)).name,
                               "shape": [int(d) for d in tensor.shape]}
    return io


def check_network(spec: ComponentSpec, io: dict, onnx_path) -> None:
    """The parsed network must have exactly the spec's tensors, with its dtypes and static dims."""
    want = {t.name: t for t in spec.tensors}
    if set(io) != set(want):
        raise ExportError(f"{onnx_path} has tensors {sorted(io)}, the {spec.name} spec names {sorted(want)}; "
                          "re-export")
    for name, got in io.items():
        t = want[name]
        static = [d if isinstance(d, int) else -1 for d in t.dims]
        if got["dtype"] != t.dtype or len(got["shape"]) != len(static) or any(
                s != -1 and g != s for g, s in zip(got["shape"], static)):
            raise ExportError(f"{onnx_path}: {name} is {got['dtype']}{got['shape']}, the spec says "
                              f"{t.dtype}{static}; re-export")


def add_profile(builder, config, profile: dict) -> dict:
    """One optimization profile from name -> (min, opt, max); returns what TensorRT holds for it."""
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(opt_profile) < 0:
        raise ExportError(f"TensorRT rejected the optimization profile {profile}")
    return {name: [[int(d) for d in dims] for dims in opt_profile.get_shape(name)] for name in profile}


def build_serialized(builder, network, config):
    """``build_serialized_network`` (module level so tests can inject failures)."""
    return builder.build_serialized_network(network, config)


def build_engine(backend: str, trt, onnx_path, spec: ComponentSpec, profile: dict, options: BuildOptions,
                 timing_cache: bytes | None = None,
                 refit: list[str] | None = None) -> tuple[object, dict, bytes | None]:
    """Build one engine; return (serialized engine, record fields, updated timing cache bytes). ``refit``:
    ONNX initializers to keep refittable (``refit.py``; fields gain ``refit_marked`` and ``refit_unknown``)."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network, parser = parse_network(trt, builder, logger, onnx_path)
    io = network_io(trt, network)
    check_network(spec, io, onnx_path)
    config = builder.create_builder_config()
    marked = None
    if refit is not None:
        from sdrt_export import refit as refit_plan

        marked = refit_plan.mark(trt, network, config, refit)
    config.builder_optimization_level = options.builder_level
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    cache = None
    if backend == "tensorrt":
        cache = config.create_timing_cache(timing_cache or b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.info("timing cache does not match this GPU or TensorRT version; starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
    elif options.targets:
        config.num_compute_capabilities = len(options.targets)
        for index, name in enumerate(options.targets):
            if not config.set_compute_capability(trt.ComputeCapability.__members__[name], index):
                raise ExportError(f"TensorRT-RTX refused GPU target {name}")
    held = add_profile(builder, config, profile)
    try:
        serialized = build_serialized(builder, network, config)
    except Exception as exc:  # the bindings raise untyped errors; one line for the user
        log.debug("%s build failed", spec.name, exc_info=True)
        logger.errors.append(f"{type(exc).__name__}: {exc}")
        serialized = None
    if serialized is None:
        reason = logger.errors[-1] if logger.errors else "no reason given"
        hint = ""
        if backend == "tensorrt-rtx" and options.workspace_gb is not None and "OutOfMemory" in reason:
            hint = " (without a GPU TensorRT-RTX cannot honour --workspace; leave it out)"
        elif marked is not None:
            hint = refit_plan.build_hint(LABELS[backend], trt.__version__)
        raise ExportError(f"{spec.name}: {LABELS[backend]} build failed: {reason}{hint}".splitlines()[0])
    new_cache = bytes(memoryview(cache.serialize())) if cache is not None else None
    fields = {"io": io, "profile": held}
    if marked is not None:
        fields["refit_marked"], fields["refit_unknown"] = marked
    del parser, network, config, builder
    return serialized, fields, new_cache
