"""``create_app(executor, options) -> FastAPI``: the whole HTTP service around one Executor.

Routes: A1111 subset (``a1111``), OpenAI images (``openai_api``), native jobs with SSE (``jobs_api``),
``/healthz``, ``/readyz``, ``/metrics`` and the web page ``/`` (``static/``). Middleware (pure ASGI, in
``middleware``): auth, body-size limit, one structured log line and metrics per request.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sdrt.serve import errors
from sdrt.serve.executor import Executor
from sdrt.serve.jobs import JobQueue, JobStore

log = logging.getLogger(__name__)

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


@dataclass
class ServeOptions:
    """Limits and settings of one server (``sdrt serve`` flags map onto these)."""

    max_queue: int = 16  # jobs waiting (not running) before 429
    max_steps: int = 150
    job_ttl: float = 600.0  # seconds finished job records are kept
    max_jobs: int = 256  # finished job records kept at most
    drain_timeout: float = 30.0
    users: dict = field(default_factory=dict)  # HTTP Basic: {user: password}
    tokens: tuple = ()  # Bearer tokens
    max_body_bytes: int = 64 * 1024 * 1024
    max_prompt_chars: int = 4000
    max_images: int = 16  # images per request (batch_size * n_iter, OpenAI n, jobs batch)
    max_image_pixels: int = 4096 * 4096  # decoded input image (also under Pillow's decompression-bomb guard)
    sync_timeout: float = 3600.0  # a synchronous request waits at most this long for its job
    store: JobStore | None = None  # job records (default: in this process)
    lora_dir: str | None = None  # --lora-dir: where <lora:NAME:W> tags and the jobs API's loras are looked up
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.users or self.tokens)


class ServeState:
    """What the routes share: executor, queue, options, metrics, and the A1111 global progress state."""

    def __init__(self, executor: Executor, options: ServeOptions):
        from sdrt.serve.metrics import Metrics

        self.executor, self.options = executor, options
        self.metrics = Metrics()
        self.queue = JobQueue(executor, max_queue=options.max_queue, ttl=options.job_ttl, max_jobs=options.max_jobs,
                              store=options.store, metrics=self.metrics)
        self.started = time.time()
        self.a1111_model = executor.manifest_info.get("name")
        self.a1111_randn_source: str | None = None  # POST /sdapi/v1/options randn_source (CPU/GPU/NV)
        self.closed = False

    @property
    def info(self) -> dict:
        return self.executor.manifest_info

    def replica_for(self, result=None) -> str:
        return result.replica if result is not None and getattr(result, "replica", None) else self.options.replica

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.drain(self.options.drain_timeout)
        self.queue.close()
        self.executor.close()


def state_of(request: Request) -> ServeState:
    return request.app.state.sdrt


def create_app(executor: Executor, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving ``executor``. Its lifespan's shutdown drains the queue (``drain_timeout``)."""
    from sdrt.serve import a1111, jobs_api, middleware, openai_api

    options = options or ServeOptions()
    state = ServeState(executor, options)

    @asynccontextmanager
    async def lifespan(app):
        yield
        import asyncio

        await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="sdrt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.sdrt = state
    errors.install(app)
    app.include_router(a1111.router, prefix="/sdapi/v1")
    app.include_router(openai_api.router, prefix="/v1")
    app.include_router(jobs_api.router, prefix="/v1")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 3)}

    @app.get("/readyz")
    async def readyz():
        if state.queue.draining or state.closed:
            return JSONResponse(errors.body("Unavailable", "draining: the server is shutting down"), 503)
        if not executor.ready():
            return JSONResponse(errors.body("Unavailable", "engines are loading"), 503)
        return {"status": "ready", "model": state.info.get("name"), "queue_depth": state.queue.depth(),
                "running": len(state.queue.running())}

    @app.get("/v1/info")
    async def info():
        data = state.info
        return {"model": data.get("name"), "family": data.get("family"), "sizes": data.get("sizes"),
                "max_steps": options.max_steps, "max_images": options.max_images}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render(state.queue.depth())
        return Response(body, media_type=content_type)

    @app.get("/")
    async def index():
        return _static("index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        return _static(name)

    middleware.install(app, state)
    return app


def _static(name: str) -> Response:
    suffix = os.path.splitext(name)[1]
    if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        raise errors.ApiError(404, f"no static file {name!r}")
    try:
        data = resources.files("sdrt.serve").joinpath("static", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise errors.ApiError(404, f"no static file {name!r}") from None
    return Response(data, media_type=STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"})
