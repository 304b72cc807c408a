"""``sdrt serve``: flags, checks (auth needed off loopback), and uvicorn with a SIGTERM drain.

This module imports only the standard library at import time (``sdrt.cli`` builds its parser from it);
fastapi / uvicorn are imported by ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
import threading

from sdrt.errors import InputError, SdrtError

log = logging.getLogger("sdrt.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sdrt.backends import BACKENDS

    p.add_argument("--engines", required=True, help="ENGINE_DIR written by `sdrt export`, loaded once at start")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; any non-loopback one needs auth")
    p.add_argument("--port", type=int, default=7860, help="TCP port (0: a free one, logged at start)")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]", help="HTTP Basic credentials")
    p.add_argument("--token-file", default=None, metavar="FILE", help="Bearer tokens, one per line")
    p.add_argument("--max-queue", type=int, default=16, help="jobs waiting before requests get 429")
    p.add_argument("--max-steps", type=int, default=150, help="largest steps a request may ask for")
    p.add_argument("--job-ttl", type=float, default=600.0, help="seconds finished job results are kept")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRA files (.safetensors) that <lora:NAME:WEIGHT> prompt tags and the jobs API's loras name")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running jobs may take to finish before they are cancelled")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve (needs sdrt[ray])")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each holding one Pipeline")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    from sdrt.serve.ray_app import add_ray_arguments  # standard library only: ray is imported by --ray

    add_ray_arguments(p)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def options_from_args(args):
    """ServeOptions from the flags; InputError when they are inconsistent (one line, exit 2)."""
    from sdrt.serve.app import ServeOptions
    from sdrt.serve.auth import parse_api_auth, read_token_file

    from sdrt.cli import check_threads

    check_threads(getattr(args, "threads", None), cap=not getattr(args, "ray", False))  # Ray: other nodes' CPUs
    users, tokens = parse_api_auth(args.api_auth), read_token_file(args.token_file)
    if not is_loopback(args.host) and not (users or tokens):
        raise InputError(f"refusing to bind {args.host} (not a loopback address) without --api-auth or --token-file")
    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--max-steps", args.max_steps, 1),
                             ("--replicas", args.replicas, 1)):
        if value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    if args.job_ttl <= 0 or args.drain_timeout < 0:
        raise InputError("--job-ttl must be > 0 and --drain-timeout >= 0")
    lora_dir = getattr(args, "lora_dir", None)
    if lora_dir is not None and not os.path.isdir(lora_dir):
        raise InputError(f"--lora-dir {lora_dir} is not a folder")
    return ServeOptions(max_queue=args.max_queue, max_steps=args.max_steps, job_ttl=args.job_ttl,
                        drain_timeout=args.drain_timeout, users=users, tokens=tokens,
                        lora_dir=os.path.abspath(lora_dir) if lora_dir else None)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or one-line SdrtError (port in use, bad address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SdrtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _import_stack():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise SdrtError(f"sdrt serve needs the serve extra ({exc.name} is missing): pip install 'sdrt[serve]'") \
            from None
    return uvicorn


def make_server(uvicorn, app, state, drain_timeout: float):
    class DrainingServer(uvicorn.Server):
        """uvicorn that, on SIGTERM/SIGINT, stops taking jobs, lets running ones finish within the drain
        timeout (then cancels them), and exits 0 instead of re-raising the signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()

        async def shutdown(self, sockets=None):
            log.info("draining: not taking new jobs; running ones get %.0f s", drain_timeout)
            state.queue.begin_drain()
            threading.Thread(target=state.queue.drain, args=(drain_timeout,), name="sdrt-drain", daemon=True).start()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout + 10, log_config=None)
    return DrainingServer(config)


def run(args) -> dict:
    if args.ray:
        try:
            from sdrt.serve import ray_app
        except ImportError as exc:
            raise SdrtError(f"--ray needs the ray extra ({exc.name} is missing): pip install 'sdrt[ray]'") from None
        return ray_app.run(args)
    options = options_from_args(args)
    uvicorn = _import_stack()
    if log.getEffectiveLevel() > logging.INFO:  # the access log and start-up lines show without -v
        log.setLevel(logging.INFO)
    from sdrt.serve.app import create_app
    from sdrt.serve.executor import LocalExecutor

    executor = LocalExecutor(args.engines, backend=args.backend, threads=args.threads)
    sock = listen(args.host, args.port)
    app = create_app(executor, options)
    state = app.state.sdrt
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    threading.Thread(target=executor.warm_up, name="sdrt-load", daemon=True).start()
    log.info("sdrt serve: %s on http://%s:%d (auth %s, max queue %d)", executor.manifest_info["name"], url_host, port,
             "on" if options.auth_enabled else "off", options.max_queue)
    server = make_server(uvicorn, app, state, options.drain_timeout)
    server.run(sockets=[sock])
    log.info("sdrt serve: stopped")
    return {}
