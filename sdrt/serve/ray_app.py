"""``sdrt serve --ray``: the same FastAPI app as a Ray Serve ingress in front of N Pipeline replicas.

- ``run(args)``: what ``sdrt serve --ray --replicas N [--ray-address ADDR]`` calls (``sdrt.serve.cli``).
  Starts a local Ray instance (loopback only, no dashboard, no usage stats) unless ``--ray-address``
  names a cluster, serves ``--host``/``--port`` through Ray Serve's proxy, and on SIGTERM/SIGINT drains
  (``--drain-timeout``), deletes the application and stops what it started.
- ``add_ray_arguments(parser)``: the per-replica flags (``--ray-num-cpus``, ``--ray-num-gpus``,
  ``--ray-max-ongoing``, ``--ray-autoscale MIN:MAX``, ``--ray-cpus``, ``--ray-temp-dir``).
- ``app_builder(args: dict)``: an application builder for ``serve run sdrt.serve.ray_app:app_builder
  engines=DIR replicas=2`` or a ``serve deploy`` config (``import_path`` + ``args``) on an existing cluster.

Deployments and the executor: ``sdrt.serve.ray_deploy``. Nothing here imports ray at module level.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from dataclasses import dataclass

from sdrt.errors import InputError

log = logging.getLogger(__name__)

APP_NAME = "sdrt"
# Set before ray is imported: no usage report, and a local instance binds 127.0.0.1 only (Ray picks the
# machine's outward address otherwise; the Windows/macOS switch is what makes it use loopback).
# SDRT_RAY_LOOPBACK: the replicas' gRPC server too (``ray_deploy.keep_replica_on_loopback``).
LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "SDRT_RAY_LOOPBACK": "1"}


@dataclass
class RaySettings:
    """How the model deployment runs (``num_replicas`` or autoscaling, resources per replica)."""

    engines: str
    backend: str = "ort-cpu"
    threads: int | None = None  # ONNX Runtime threads per replica; None: the replica's num_cpus
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing: int = 1  # generations a replica accepts at once (it runs one; more wait in the replica)
    autoscale: tuple[int, int] | None = None  # (min_replicas, max_replicas)

    def __post_init__(self):
        if int(self.replicas) < 1 and self.autoscale is None:
            raise InputError(f"--replicas must be >= 1, got {self.replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise InputError("--ray-num-cpus and --ray-num-gpus must be >= 0")
        if int(self.max_ongoing) < 1:
            raise InputError(f"--ray-max-ongoing must be >= 1, got {self.max_ongoing}")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not 0 <= lo <= hi or hi < 1:
                raise InputError(f"--ray-autoscale needs 0 <= MIN <= MAX, MAX >= 1; got {lo}:{hi}")

    @property
    def concurrency(self) -> int:
        """Generations the ingress keeps in flight: every slot of the largest deployment (requests beyond
        the running replicas wait in Ray's router, which is what the autoscaler scales on)."""
        most = self.autoscale[1] if self.autoscale else int(self.replicas)
        return max(1, most * int(self.max_ongoing))

    @property
    def replica_threads(self) -> int | None:
        if self.threads:
            return int(self.threads)
        return max(1, int(self.num_cpus)) if self.num_cpus >= 1 else 1


def parse_autoscale(text) -> tuple[int, int] | None:
    if text in (None, ""):
        return None
    if isinstance(text, dict):
        return int(text["min_replicas"]), int(text["max_replicas"])
    try:
        lo, hi = str(text).split(":")
        return int(lo), int(hi)
    except ValueError:
        raise InputError(f"--ray-autoscale takes MIN:MAX (e.g. 1:4), got {text!r}") from None


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the Ray mode beyond ``--ray --replicas --ray-address`` (which ``sdrt.serve.cli`` defines)."""
    group = parser.add_argument_group("Ray Serve (with --ray)")
    group.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs per model replica (default 1)")
    group.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs per model replica (default 0)")
    group.add_argument("--ray-max-ongoing", type=int, default=1,
                       help="requests one replica accepts at once (Ray Serve max_ongoing_requests, default 1)")
    group.add_argument("--ray-autoscale", metavar="MIN:MAX", default=None,
                       help="autoscale the replicas between MIN and MAX instead of a fixed --replicas")
    group.add_argument("--ray-cpus", type=int, default=None,
                       help="logical CPUs of the local Ray instance (default: enough for the replicas)")
    group.add_argument("--ray-temp-dir", default=None, help="session/log folder of the local Ray instance")


def settings_from_args(args) -> RaySettings:
    return RaySettings(engines=str(args.engines), backend=getattr(args, "backend", "ort-cpu") or "ort-cpu",
                       threads=getattr(args, "threads", None), replicas=int(getattr(args, "replicas", None) or 1),
                       num_cpus=float(getattr(args, "ray_num_cpus", 1.0)),
                       num_gpus=float(getattr(args, "ray_num_gpus", 0.0)),
                       max_ongoing=int(getattr(args, "ray_max_ongoing", 1)),
                       autoscale=parse_autoscale(getattr(args, "ray_autoscale", None)))


def build(settings: RaySettings, options):
    """The Serve application: ``SdrtIngress`` (one replica) bound to ``SdrtModel`` (the Pipelines)."""
    from ray import serve

    from sdrt.serve.ray_deploy import SdrtIngress, SdrtModel

    model_options = {"ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
                     "max_ongoing_requests": int(settings.max_ongoing)}
    if settings.autoscale:
        lo, hi = settings.autoscale
        model_options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                               "target_ongoing_requests": int(settings.max_ongoing)}
    else:
        model_options["num_replicas"] = int(settings.replicas)
    model = serve.deployment(SdrtModel, name="SdrtModel", **model_options).bind(
        settings.engines, settings.backend, settings.replica_threads)
    ingress = serve.deployment(serve.ingress()(SdrtIngress), name="SdrtIngress", num_replicas=1,
                               max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                               graceful_shutdown_timeout_s=10)
    return ingress.bind(model, options, settings.concurrency)


def app_builder(args: dict):
    """``serve run``/``serve deploy`` entry point. ``args``: ``engines`` (required) and optionally
    ``backend``, ``threads``, ``replicas``, ``num_cpus``, ``num_gpus``, ``max_ongoing``, ``autoscale``
    ("MIN:MAX"), ``api_auth``, ``token_file``, ``max_queue``, ``max_steps``, ``job_ttl``, ``drain_timeout``,
    ``lora_dir`` (the same path on every node),
    and ``host`` (the config's ``http_options.host``; a non-loopback host needs ``api_auth`` or ``token_file``,
    as ``sdrt serve`` refuses it otherwise)."""
    from sdrt.serve.cli import options_from_args

    args = dict(args or {})
    if not args.get("engines"):
        raise InputError("app_builder needs args.engines (the ENGINE_DIR on every node)")
    ns = argparse.Namespace(
        engines=args["engines"], host=args.get("host", "127.0.0.1"), port=int(args.get("port", 8000)),
        backend=args.get("backend", "ort-cpu"), threads=args.get("threads"), api_auth=args.get("api_auth"),
        token_file=args.get("token_file"), max_queue=int(args.get("max_queue", 16)),
        max_steps=int(args.get("max_steps", 150)), job_ttl=float(args.get("job_ttl", 600)),
        drain_timeout=float(args.get("drain_timeout", 30)), ray=True, replicas=int(args.get("replicas", 1)),
        ray_address=None, ray_num_cpus=float(args.get("num_cpus", 1)), ray_num_gpus=float(args.get("num_gpus", 0)),
        ray_max_ongoing=int(args.get("max_ongoing", 1)), ray_autoscale=args.get("autoscale"),
        lora_dir=args.get("lora_dir"))
    return build(settings_from_args(ns), options_from_args(ns))


def _start_ray(args, settings: RaySettings) -> bool:
    """Connect to ``--ray-address`` or start a local instance; True when it is ours to stop."""
    import ray

    if args.ray_address:
        ray.init(address=args.ray_address, namespace=APP_NAME, configure_logging=False)
        return False
    cpus = getattr(args, "ray_cpus", None) or max(os.cpu_count() or 1,
                                                   int(settings.concurrency * settings.num_cpus + 0.999))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, namespace=APP_NAME,
             configure_logging=False, _temp_dir=getattr(args, "ray_temp_dir", None))
    return True


def _check_port(host: str, port: int) -> int:
    """The port Ray's proxy will bind (``--port 0``: a free one), or a one-line SdrtError if it is taken."""
    from sdrt.serve.cli import listen

    sock = listen(host, port)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def run(args) -> dict:
    """Serve until SIGTERM/SIGINT; then drain, delete the application and stop what was started (exit 0)."""
    from sdrt.errors import SdrtError
    from sdrt.serve.cli import options_from_args

    options = options_from_args(args)  # auth, limits; refuses a non-loopback bind without auth
    settings = settings_from_args(args)
    port = _check_port(args.host, int(args.port))  # a port in use fails now, not after Ray's start
    if not args.ray_address:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise SdrtError(f"--ray needs the ray extra ({exc.name} is missing): pip install 'sdrt[ray]'") from None
    if log.getEffectiveLevel() > logging.INFO:  # start-up and shutdown lines show without -v
        log.setLevel(logging.INFO)

    owned = _start_ray(args, settings)
    stop = threading.Event()
    # after ray.init, whose own SIGTERM handler (a crash reporter) would otherwise abort the process
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            serve.start(proxy_location="HeadOnly" if owned else "EveryNode",
                        http_options={"host": args.host, "port": port})
        except RuntimeError as exc:  # Ray's proxy could not bind (taken since the check)
            raise SdrtError(f"cannot listen on {args.host}:{port}: {str(exc).splitlines()[-1][:200]}") from None
        # the app logs one line per request itself; Serve's access log would repeat it
        handle = serve.run(build(settings, options), name=APP_NAME, route_prefix="/",
                           logging_config={"enable_access_log": False})
        log.info("sdrt serve --ray: %s replicas of %s on http://%s:%d", settings.autoscale or settings.replicas,
                 settings.engines, args.host, port)
        while not stop.wait(1.0):
            pass
        log.info("shutting down: draining for up to %.0f s", options.drain_timeout)
        try:
            handle.drain.remote(options.drain_timeout).result(timeout_s=options.drain_timeout + 30)
        except Exception as exc:  # the ingress may be gone already; shutting down goes on
            log.warning("drain did not complete: %s", type(exc).__name__)
        serve.delete(APP_NAME)
    finally:
        try:
            if owned:
                serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    log.info("sdrt serve --ray: stopped")
    return {}
