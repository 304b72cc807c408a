"""ONNX Runtime backend (CPU provider; CUDA provider with IO binding when onnxruntime-gpu is installed)."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.backends import ort_native
from sdrt.errors import ArtifactError, InputError
from sdrt.manifest import Manifest
from sdrt.specs import ComponentSpec

log = logging.getLogger(__name__)

# Opt-in: a folder where CPU sessions keep their optimized graphs, so later loads skip graph optimization
# and memory-map the weights (UNet session creation 7.9 s -> 2.1 s for SD1.5; benchmarks/NOTES.md).
CACHE_ENV = "SDRT_ORT_CACHE"


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


def native_options(threads: int | None) -> ort.SessionOptions:
    """For a CPU-native graph: already optimized for this CPU, so no graph optimization at load."""
    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def _cache_key(path: Path) -> str:
    """Source files' identity, ONNX Runtime version and CPU: an ENABLE_ALL graph is specific to all three."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = "".join(ln for ln in handle if ln.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    files = [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(f"{ort.__version__}|{cpu}|{stamp}".encode()).hexdigest()[:16]


def _open_cached(path: Path, threads: int | None, cache: Path, providers: list) -> ort.InferenceSession:
    """Open the cached optimized graph of ``path``, or open ``path`` and save its optimized graph there."""
    target = cache / f"{path.stem}-{_cache_key(path)}"
    if (target / "model.onnx").is_file():
        options = session_options(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(target / "model.onnx"), options, providers=providers)
        except Exception as exc:  # a damaged cache entry: rebuild it from the artifact
            log.warning("ignoring ORT cache %s (%s)", target, str(exc).splitlines()[0])
            shutil.rmtree(target, ignore_errors=True)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=cache))
    except OSError as exc:
        log.warning("cannot write ORT cache %s (%s); opening without it", cache, exc.strerror)
        return ort.InferenceSession(str(path), session_options(threads), providers=providers)
    options = session_options(threads)
    options.optimized_model_filepath = str(work / "model.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
        os.replace(work, target)
    except OSError:  # another process filled the entry first; this session is as good
        log.debug("ORT cache %s written concurrently", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return session


def open_ort(manifest: Manifest, component: str, backend: str = "ort-cpu", threads: int | None = None,
             **engine_options) -> "OrtEngine":
    """Open one component for an ort-* backend after checking the files it uses against the manifest.
    ort-cpu opens the component's CPU-native graph when one matches this CPU and ONNX Runtime
    (``ort_native.py``), else the graph ``sdrt build-engines`` optimized, else the exported ONNX.
    ``engine_options`` go to ``OrtEngine`` (run-time LoRA: they keep to the portable graph, whose names they use)."""
    spec = manifest.specs[component]
    if backend == "ort-cpu" and not os.environ.get(CACHE_ENV) and not engine_options:
        return _open_cpu(manifest, component, spec, threads)  # SDRT_ORT_CACHE: the user's own cache instead
    record = manifest.engines(backend).get("components", {}).get(component)
    if record and record.get("version") == ort.__version__:
        path, _ = manifest.verified_engine(backend, component)
    else:
        if record:
            log.warning("%s: the %s graph was optimized by onnxruntime %s, this is %s; running the exported ONNX "
                        "(rebuild with `%s`)", component, backend, record.get("version"), ort.__version__,
                        manifest.rebuild_command(backend))
        path = manifest.verified_path(component)
    return OrtEngine(path, spec, device="cuda" if backend == "ort-cuda" else "cpu", threads=threads, **engine_options)


# what a txt2img opens, in order: its files are checked ahead, each while the one before is being opened
# (SD: text encoders, UNet, VAE decoder; Kandinsky 2.2: prior text encoder, prior, decoder UNet, MoVQ decoder)
AHEAD = ("prior_text_encoder", "prior", "text_encoder", "text_encoder_2", "unet", "vae_decoder", "movq_decoder")


def _usable_native(manifest: Manifest, component: str) -> tuple[tuple, dict | None, str | None]:
    """(portable source (kind, files), native record or None, why that record is refused or None)."""
    source = ort_native.source_of(manifest, component)
    record = manifest.engines(ort_native.NATIVE).get("components", {}).get(component)
    return source, record, ort_native.problem(record, *source) if record else None


def _weight_files(files: list[dict]) -> list[dict]:
    """The raw weight data files among a graph's files (hashed while its session is created)."""
    return [f for f in files if f["path"].endswith(".data")]


def _open_checked(manifest: Manifest, files: list[dict], fix: str | None, opener):
    """``opener()``'s engine, returned only once every file in ``files`` matched its digest. Graphs (which
    ONNX Runtime parses) are checked before it starts; weight data files (``.data``: raw tensors read at the
    offsets and sizes the checked graph gives, the bulk of the bytes) are hashed on the check thread while
    the session is created, since its weight prepacking is single-threaded and leaves a core free. A
    mismatch drops the session and raises; it outranks any error ONNX Runtime gave meanwhile."""
    weights = _weight_files(files)
    manifest.verify_ahead(weights)  # (already queued ones stay queued)
    for file in files:
        if file not in weights:
            manifest.check_file(file, fix)
    try:
        engine = opener()
    finally:
        for file in weights:
            manifest.check_file(file, fix)
    return engine


def _open_cpu(manifest: Manifest, component: str, spec: ComponentSpec, threads: int | None) -> "OrtEngine":
    (kind, files), record, refused = _usable_native(manifest, component)
    if not manifest._ahead_started:  # the first engine of this artifact: its weights, then the next components'
        manifest._ahead_started.append(component)
        ahead = _weight_files(record["files"] if record and refused is None else files)
        for name in (n for n in AHEAD if n != component and manifest.has(n)):
            (_, source), native, why = _usable_native(manifest, name)
            ahead += native["files"] if native and why is None else source
        manifest.verify_ahead(ahead)
    fix = f"rebuild with `{manifest.rebuild_command('ort-cpu')}`" if kind == "ort-cpu" else None
    path = manifest.root / files[0]["path"]
    for file in files:  # the artifact stays whole: a missing or resized source is an error even when unused
        source = manifest.root / file["path"]
        if not source.is_file() or source.stat().st_size != file["size"]:
            manifest.check_file(file, fix)  # raises the usual error
    if record and refused is None:
        native = manifest.root / record["files"][0]["path"]
        try:
            return _open_checked(manifest, record["files"], fix,
                                 lambda: OrtEngine(path, spec, threads=threads, native=native))
        except ArtifactError as exc:
            refused = str(exc)
    if record is None:
        log.info("%s: no %s graph in %s; opening %s with graph optimization (slower load)", component,
                 ort_native.NATIVE, manifest.root, path.name)
        return _open_checked(manifest, files, fix, lambda: OrtEngine(path, spec, threads=threads))
    for file in files:  # checked before anything is optimized from them and saved
        manifest.check_file(file, fix)
    log.warning("%s: its %s graph is refused: %s; opening %s instead", component, ort_native.NATIVE, refused, path.name)
    try:
        session = ort_native.rebuild(manifest, component, path, (kind, files), session_options(threads),
                                     ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}".splitlines()[0]) from None
    return OrtEngine(path, spec, threads=threads, session=session)


class OrtEngine:
    """One component as an ONNX Runtime session, called with the spec's input names."""

    def __init__(self, path: Path, spec: ComponentSpec, device: str = "cpu", threads: int | None = None,
                 initializers: dict | None = None, native: Path | None = None,
                 session: ort.InferenceSession | None = None, model_bytes: bytes | None = None):
        """Run-time LoRA (``sdrt.lora_runtime``): ``initializers``: {name: array} replacing external-data
        initializers of ``path`` (``SessionOptions.add_external_initializers``, which refuses others; kept alive
        here, ORT does not copy them); ``model_bytes``: ``path``'s ONNX with its inline weights patched, opened
        instead of it (``add_initializer`` on inline weights is ignored by the graph optimizers that fold them).
        ``native``: the verified CPU-native graph of ``path``, opened instead of it without graph
        optimization; ``session``: a session already created on ``path``."""
        self.spec = spec
        self.device = device
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError("backend ort-cuda needs onnxruntime-gpu and a CUDA device; use ort-cpu")
            providers.insert(0, "CUDAExecutionProvider")
        cache = os.environ.get(CACHE_ENV)
        try:
            if session is not None:
                self.session = session
            elif native is not None and device == "cpu" and not initializers and model_bytes is None:
                self.session = ort.InferenceSession(str(native), native_options(threads), providers=providers)
            elif cache and device == "cpu" and not initializers and model_bytes is None:
                self.session = _open_cached(Path(path), threads, Path(cache), providers)
            else:
                options = session_options(threads)
                if initializers:
                    self._initializers = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                                          for a in initializers.values()]
                    options.add_external_initializers(list(initializers), self._initializers)
                if model_bytes is not None:  # its external data (if any) lies beside path
                    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                     str(Path(path).parent))
                self.session = ort.InferenceSession(str(path) if model_bytes is None else model_bytes, options,
                                                    providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}".splitlines()[0]) from None
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # onnxruntime-gpu falls back to the CPU, with a log line only, when CUDA or cuDNN fail to load
            raise InputError("backend ort-cuda: ONNX Runtime could not start its CUDA provider (no GPU, or the "
                             "CUDA/cuDNN libraries it needs not found: see onnxruntime.preload_dlls); use ort-cpu")
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        missing = set(self._dtypes) - {i.name for i in self.session.get_inputs()}
        if missing:
            raise ArtifactError(f"{path} lacks inputs {sorted(missing)} that the {spec.name} spec names; re-export")

    def __call__(self, feeds: dict) -> dict:
        missing = [name for name in self._dtypes if name not in feeds]
        if missing:
            raise InputError(f"{self.spec.name}: missing input {missing[0]!r}")
        if self.device == "cuda" and any(hasattr(v, "__cuda_array_interface__") for v in feeds.values()):
            return self._run_on_device(feeds)
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

    def _run_on_device(self, feeds: dict) -> dict:
        """CUDA provider with device feeds (cupy): inputs and outputs bound in place, results as cupy arrays,
        so a device-resident loop never copies through the host."""
        import cupy

        binding = self.session.io_binding()
        inputs = {name: cupy.ascontiguousarray(cupy.asarray(feeds[name]), dtype=dtype)
                  for name, dtype in self._dtypes.items()}
        outputs = {name: cupy.empty(shape, np.dtype(self.spec.tensor(name).dtype)) for name, shape in
                   self.spec.output_shapes({n: v.shape for n, v in inputs.items()}).items()}
        for bind, arrays in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
            for name, value in arrays.items():
                bind(name, "cuda", value.device.id, value.dtype, list(value.shape), value.data.ptr)
        cupy.cuda.get_current_stream().synchronize()  # the feeds' producer has finished
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # ONNX Runtime's stream has finished before cupy reads the outputs
        return outputs
